"""Put first on the ``PYTHONPATH`` of the daemons the tests start: their ``import pynvml``
fails as on a machine without nvidia-ml-py, so no daemon reads a real card (its
external use would change what the tests' budgets leave)."""

raise ImportError("pynvml is hidden from the daemons the tests start")
