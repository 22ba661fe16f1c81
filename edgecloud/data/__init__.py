"""Data sets (Fashion-MNIST IDX, CIFAR-10 pickles / image folders), splits and an in-memory loader."""

from edgecloud.data.cifar import load_cifar10
from edgecloud.data.classes import CIFAR10_CLASSES, FASHION_MNIST_CLASSES
from edgecloud.data.dataset import ImageDataset, train_val_split
from edgecloud.data.fashion_mnist import load_fashion_mnist
from edgecloud.data.loader import Loader
from edgecloud.data.registry import load_dataset

__all__ = [
    "CIFAR10_CLASSES", "FASHION_MNIST_CLASSES", "ImageDataset", "Loader", "load_cifar10",
    "load_dataset", "load_fashion_mnist", "train_val_split",
]
