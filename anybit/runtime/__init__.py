"""Model runner, KV cache allocation, loader, sampler, CUDA graphs: tensors in, tokens out."""
