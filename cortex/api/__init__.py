"""cortex's public edge: conversions between the public API (cortex.v1) and the node API (neuron.v1)."""
