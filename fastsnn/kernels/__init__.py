"""Triton kernels and their launch helpers. No nn.Modules, no autograd here."""


def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1): block sizes."""
    return 1 << max(0, int(n) - 1).bit_length()
