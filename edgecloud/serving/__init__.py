"""The serving parts both daemons share: the gRPC server shell, dynamic batching, TLS and token
security, the OIP client, the load generator and the Prometheus metrics.

The edge daemon (:mod:`edgecloud.edge`) and the cloud server (:mod:`edgecloud.cloud`) are thin
protocol adapters over their data planes; what they have in common lives here.
"""
