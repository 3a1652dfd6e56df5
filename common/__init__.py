"""What cortex and neuron share: server plumbing, errors, logging and configuration."""
