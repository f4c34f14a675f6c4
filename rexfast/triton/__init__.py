"""Triton kernels. Imported lazily by the op layer so `import rexfast` works without triton."""
