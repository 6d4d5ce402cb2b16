"""Triton kernels and their launch helpers. No nn.Modules, no autograd here."""
