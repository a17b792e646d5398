"""vggcache: run a frozen VGG16 body over an image folder once, then train fast heads on the cached features."""

__version__ = "0.1.0"
