"""The edge daemon: OIP servicer, runner (backend + exits + energy), cloud link, admin API."""
