"""The image augmentation flags (issue 29 item 4): --randaugment N M, --trivialaugment, --random-erasing P beside
--autoaugment and --cutout; what the pipeline holds, what it does to an image, config.yaml round trips and the
one-line refusals."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from fastsnn import data
from fastsnn.training import config as C


def _parse(*argv):
    cfg, given = C.parse(["--method", "ce", *argv])  # CIFAR/ImageNet distillation would need --teacher-weights
    C.resolve(cfg)
    C.validate(cfg)
    return cfg, given


def _image(size=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("argv,kinds", [
    ([], []),
    (["--autoaugment", "--cutout", "8"], [v2.AutoAugment, data.Cutout]),
    (["--randaugment", "2", "9", "--random-erasing", "0.25"], [v2.RandAugment, v2.RandomErasing]),
    (["--trivialaugment", "--random-erasing", "1"], [v2.TrivialAugmentWide, v2.RandomErasing]),
])
@pytest.mark.parametrize("dataset", ["cifar100", "imagenet"])
def test_flags_build_the_pipeline_and_round_trip_through_config_yaml(tmp_path, argv, kinds, dataset):
    if dataset == "imagenet":
        for split in ("train", "val"):
            (tmp_path / split).mkdir()
    cfg, given = _parse("--dataset", dataset, "--data-dir", str(tmp_path), *argv)
    augment = C.augment_of(cfg)
    pipeline = augment.transforms([], (0.5,) * 3, (0.25,) * 3, dataset)
    extra = [type(t) for t in pipeline.transforms
             if isinstance(t, (v2.AutoAugment, v2.RandAugment, v2.TrivialAugmentWide, v2.RandomErasing, data.Cutout))]
    assert extra == kinds
    if "--randaugment" in argv:
        ra = next(t for t in pipeline.transforms if isinstance(t, v2.RandAugment))
        assert (ra.num_ops, ra.magnitude) == (2, 9) and cfg.randaugment == "2 9"
    if "--autoaugment" in argv:
        aa = next(t for t in pipeline.transforms if isinstance(t, v2.AutoAugment))
        assert aa.policy == (v2.AutoAugmentPolicy.IMAGENET if dataset == "imagenet" else v2.AutoAugmentPolicy.CIFAR10)
    with pytest.raises(ValueError, match="policy must be one of cifar10, cifar100, imagenet, got 'digits'"):
        augment.transforms([], (0.5,) * 3, (0.25,) * 3, "digits")
    out = pipeline(_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    (tmp_path / "config.yaml").write_text(C.to_yaml(cfg))
    again, given_again = C.parse(["--config", str(tmp_path / "config.yaml")])
    C.resolve(again)
    assert again.saved() == cfg.saved() and C.augment_of(again) == augment
    assert {"randaugment", "trivialaugment", "random_erasing", "autoaugment", "cutout"} <= set(again.saved())
    assert {"randaugment", "trivialaugment", "random_erasing"} <= C.RESUME_COMPATIBLE


def test_without_augmentation_the_image_is_only_normalised():
    pipeline = data.Augment().transforms([], (0.5,) * 3, (0.25,) * 3, "cifar10")
    img = _image()
    expected = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(pipeline(img), expected, atol=1e-6)


def test_random_erasing_with_probability_one_zeroes_a_rectangle():
    pipeline = data.Augment(random_erasing=1.0).transforms([], (0.5,) * 3, (0.25,) * 3, "cifar10")
    torch.manual_seed(0)
    img = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))  # normalised to 2 everywhere
    out = pipeline(img)
    erased = (out == 0).all(0)
    rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
    assert erased.sum() > 0 and (out[:, ~erased] == 2).all()
    # one rectangle: every pixel of its bounding box is erased
    assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_randaugment_reads_the_pair_from_yaml_as_a_list_or_a_string(tmp_path):
    for text in ("randaugment: [3, 10]\n", "randaugment: '3 10'\n"):
        (tmp_path / "c.yaml").write_text(text + "dataset: cifar10\n")
        cfg, given = C.parse(["--config", str(tmp_path / "c.yaml")])
        assert cfg.randaugment == "3 10" and "randaugment" in given


@pytest.mark.parametrize("argv,words", [
    (["--randaugment", "2", "31"], "--randaugment takes N M, the number of ops in 1..16 and the magnitude in 0..30"),
    (["--randaugment", "0", "9"], "--randaugment takes N M"),
    (["--randaugment", "two", "9"], "--randaugment takes N M"),
    (["--autoaugment", "--randaugment", "2", "9"], "--autoaugment and --randaugment: give one augmentation policy"),
    (["--randaugment", "2", "9", "--trivialaugment"], "--randaugment and --trivialaugment: give one"),
    (["--random-erasing", "1.5"], "--random-erasing must be in [0, 1], got 1.5"),
    (["--random-erasing", "-0.1"], "--random-erasing must be in [0, 1]"),
])
def test_bad_augmentation_flags_are_one_line(tmp_path, argv, words):
    with pytest.raises(C.UsageError) as e:
        _parse("--dataset", "cifar10", "--data-dir", str(tmp_path), *argv)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flag", [["--autoaugment"], ["--trivialaugment"], ["--randaugment", "2", "9"],
                                  ["--random-erasing", "0.5"], ["--cutout", "4"]])
def test_augmentation_on_a_bundled_data_set_is_refused(flag):
    with pytest.raises(C.UsageError, match=f"{flag[0]} applies to cifar10, cifar100 and imagenet; digits"):
        _parse(*flag)


def test_a_bad_randaugment_in_yaml_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("randaugment: [2, 99]\n")
    with pytest.raises(C.UsageError, match="randaugment takes N M"):
        C.parse(["--config", str(tmp_path / "c.yaml")])
