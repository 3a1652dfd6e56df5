"""neuron: the node agent that holds model shards on devices and runs them."""
__version__ = "0.1.0"
