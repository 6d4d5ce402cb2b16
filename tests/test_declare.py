"""fastsnn.ops._declare: an op's arguments and gradients by name, from its signature."""
import pytest

from fastsnn.ops._declare import Args


def _op(ctx, x, weight, bias, spec, repeat=0):
    pass


def test_names_come_from_the_signature_without_ctx():
    args = Args(_op)
    assert args.names == ("x", "weight", "bias", "spec", "repeat")
    bound = args.bind((1, 2, 3, "s", 4))
    assert (bound.x, bound.weight, bound["repeat"]) == (1, 2, 4) and args.values(bound, ("spec", "x")) == ("s", 1)


def test_gradients_by_name_fill_every_other_argument_with_none():
    args = Args(_op)
    assert args.grads(bias="gb", x="gx") == ("gx", None, "gb", None, None)
    assert args.returning("bias", "x")("gb", "gx") == args.grads(bias="gb", x="gx")
    assert args.returning()() == (None,) * 5
    with pytest.raises(KeyError):
        args.grads(wieght="gw")  # a misspelt name is an error, not a dropped gradient
    with pytest.raises(KeyError):
        args.returning("wieght")
