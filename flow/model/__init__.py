"""The SANF-AD normalizing flow: coupling layers with CAFF subnets, the flow module, its training loop.

Tensors in, tensors out: nothing here reads files, images or HDF5 (docs/architecture.md)."""
