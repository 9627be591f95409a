"""Losses against references computed another way: full-matrix formulas on one process, open_clip's
losses, and the same losses split over 2 and 4 gloo ranks."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.config import ConfigError, LossConfig, load_config
from contrastive.errors import UserError
from contrastive.losses import _TiledInfoNCE, build_loss, infonce, infonce_tiled, siglip
from tests.dist import run_ranks

RTOL = 1e-5  # relative error allowed in fp32 (max abs difference over max abs value)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(num: int, dim: int, *, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(num, dim, generator=gen, dtype=dtype), dim=1)
    text = F.normalize(torch.randn(num, dim, generator=gen, dtype=dtype), dim=1)
    # Correlate pairs so positives score higher than negatives, as in training.
    text = F.normalize(text + 0.8 * image, dim=1)
    return image, text


def _reference_infonce(image, text, scale, label_smoothing=0.0):
    """CLIP loss from the full G x G matrix, with smoothing written out (not torch's cross_entropy)."""
    logits = scale * image @ text.T
    num = logits.shape[0]
    target = torch.full_like(logits, label_smoothing / num) + (1 - label_smoothing) * torch.eye(num, dtype=logits.dtype)
    loss_img = -(target * logits.log_softmax(1)).sum(1).mean()
    loss_txt = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_img + loss_txt)


def _reference_siglip(image, text, scale, bias):
    """SigLIP as in the paper: labels +1 on the diagonal and -1 elsewhere, -log sigmoid(label * logit)."""
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def _grads(loss_fn, image, text, scale, bias=None, **kwargs):
    """Loss and gradients w.r.t. (image, text, scale[, bias]) of loss_fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale) + ((bias,) if bias is not None else ())]
    loss = loss_fn(*leaves[:3], leaves[3] if bias is not None else None, **kwargs)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _assert_close(got, want, what=""):
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    assert err < RTOL, f"{what}: relative error {err:.2e}"


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_infonce_matches_the_full_matrix_formula(label_smoothing):
    image, text = _features(48, 16, seed=0)
    scale = torch.tensor([14.3])
    got = _grads(infonce, image, text, scale, label_smoothing=label_smoothing)
    want = _grads(lambda i, t, s, b: _reference_infonce(i, t, s, label_smoothing), image, text, scale)
    for g, w, name in zip(got, want, ("loss", "d image", "d text", "d scale")):
        _assert_close(g, w, name)


def _reference_multi_positive(image, text, scale, keys):
    """Identical captions as positives, written out: each row's loss is the mean over its positives of
    -log softmax, in both directions."""
    logits = scale * image @ text.T
    pos = (keys[:, None] == keys[None, :]).float()
    loss_img = -((pos * logits.log_softmax(1)).sum(1) / pos.sum(1)).mean()
    loss_txt = -((pos * logits.T.log_softmax(1)).sum(1) / pos.sum(1)).mean()
    return 0.5 * (loss_img + loss_txt)


def test_identical_captions_as_positives_match_the_written_out_formula():
    image, text = _features(24, 8, seed=3)
    keys = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5, 0] + list(range(6, 21)))
    text = text.clone()
    for i, k in enumerate(keys.tolist()):  # identical captions embed identically
        text[i] = text[keys.tolist().index(k)]
    scale = torch.tensor([12.0])
    got = _grads(infonce, image, text, scale, positive_keys_B=keys)
    want = _grads(lambda i, t, s, b: _reference_multi_positive(i, t, s, keys), image, text, scale)
    for g, w, part in zip(got, want, ("loss", "d image", "d text", "d scale")):
        _assert_close(g, w, part)
    # All captions distinct: the same as CLIP's loss.
    distinct = _grads(infonce, image, text, scale, positive_keys_B=torch.arange(24))
    for g, w in zip(distinct, _grads(infonce, image, text, scale)):
        _assert_close(g, w)


def test_caption_keys_are_equal_exactly_for_equal_token_rows():
    from contrastive.losses import caption_keys

    tokens = torch.tensor([[49406, 320, 1929, 49407, 0], [49406, 320, 1929, 49407, 0], [49406, 320, 1930, 49407, 0],
                           [49406, 320, 49407, 0, 0]])
    keys = caption_keys(tokens)
    assert keys.dtype == torch.int64 and keys[0] == keys[1] and len(set(keys[1:].tolist())) == 3
    many = caption_keys(torch.randint(0, 49408, (5000, 16)))
    assert len(set(many.tolist())) == 5000


def test_positive_keys_follow_loss_positives():
    from contrastive.config import LossConfig
    from contrastive.losses import build_loss, caption_keys
    from contrastive.train import positive_keys

    tokens = torch.tensor([[1, 5, 2], [1, 5, 2], [1, 6, 2], [1, 7, 2]])
    classes = torch.tensor([3, -1, 3, -1])
    assert positive_keys(build_loss(LossConfig()), tokens, classes) is None
    by_caption = positive_keys(build_loss(LossConfig(positives="caption")), tokens, classes)
    torch.testing.assert_close(by_caption, caption_keys(tokens))
    by_class = positive_keys(build_loss(LossConfig(positives="class")), tokens, classes)
    # Rows 0 and 2 share class 3 (different captions); row 1 keeps its caption's key, so it is not row 0's twin.
    assert by_class[0] == by_class[2] == 3 and by_class[1] == caption_keys(tokens)[1] != by_class[0]
    assert len(set(by_class.tolist())) == 3


@pytest.mark.parametrize("tile_size", [1, 7, 16, 48, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_tiled_equals_plain_on_one_rank(tile_size, label_smoothing):
    """Tiles that divide the batch, that do not, a single tile and a tile larger than the batch."""
    image, text = _features(48, 16, seed=1)
    scale = torch.tensor([30.0])
    got = _grads(infonce_tiled, image, text, scale, label_smoothing=label_smoothing, tile_size=tile_size)
    want = _grads(infonce, image, text, scale, label_smoothing=label_smoothing)
    for g, w, name in zip(got, want, ("loss", "d image", "d text", "d scale")):
        _assert_close(g, w, f"tile {tile_size} {name}")


def test_tiled_gradients_pass_gradcheck_in_float64():
    """Finite differences, including per-sample upstream gradients of either sign (the general backward)."""
    image, text = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64)
    leaves = tuple(t.clone().requires_grad_() for t in (image, text, scale))
    weights = torch.randn(2, 9, dtype=torch.float64)

    def per_sample(i, t, s):
        loss_img, loss_txt = _TiledInfoNCE.apply(i, t, s, None, 0, 0.2, 4)
        return loss_img * weights[0], loss_txt * weights[1]

    assert torch.autograd.gradcheck(per_sample, leaves)
    assert torch.autograd.gradcheck(lambda i, t, s: infonce_tiled(i, t, s, label_smoothing=0.1, tile_size=2), leaves)


def test_tiled_is_stable_at_extreme_logits():
    """Logit scale 100 with rows and columns whose every logit is far below the others' (no overflow,
    no underflow to -inf): a text pointing away from every image, an image pointing away from every text."""
    image, text = _features(32, 8, seed=2, dtype=torch.float64)
    text[5] = -image.mean(0) / image.mean(0).norm()
    image[9] = -text.mean(0) / text.mean(0).norm()
    scale = torch.tensor([100.0], dtype=torch.float64)
    want = _grads(infonce, image, text, scale)
    got = _grads(infonce_tiled, image.float(), text.float(), scale.float(), tile_size=8)
    assert all(torch.isfinite(g).all() for g in got)
    for g, w, name in zip(got, want, ("loss", "d image", "d text", "d scale")):
        _assert_close(g.double(), w, name)


def test_tiled_takes_bfloat16_features_and_computes_in_float32():
    image, text = _features(40, 16, seed=3)
    image, text = image.bfloat16(), text.bfloat16()
    scale = torch.tensor([20.0])
    got = _grads(infonce_tiled, image, text, scale, tile_size=16)
    want = _grads(infonce, image.float(), text.float(), scale)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    _assert_close(got[0].float(), want[0], "loss")
    _assert_close(got[3], want[3], "d scale")
    for g, w in zip(got[1:3], want[1:3]):  # only rounded to bf16 on the way out
        assert ((g.float() - w).abs().max() / w.abs().max()).item() < 1e-2


def test_tiled_never_materialises_a_batch_by_batch_matrix():
    """Record the size of every tensor any op creates during forward and backward: the tiled loss stays
    within the features and one tile, while the plain loss (the check's own control) builds G x G."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    num, dim, tile = 512, 8, 64
    image, text = _features(num, dim, seed=4)
    scale = torch.tensor([14.0])
    for loss_fn, kwargs in ((infonce_tiled, {"tile_size": tile}), (infonce, {})):
        leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
        with LargestTensor() as largest:
            loss_fn(*leaves, **kwargs).backward()
        if loss_fn is infonce_tiled:
            assert largest.numel <= max(num * dim, tile * tile), largest.numel
        else:
            assert largest.numel >= num * num


@pytest.mark.parametrize("num", [32, 33])
def test_siglip_matches_the_paper_formula(num):
    image, text = _features(num, 16, seed=5)
    scale, bias = torch.tensor([10.0]), torch.tensor([-10.0])
    got = _grads(siglip, image, text, scale, bias)
    want = _grads(lambda i, t, s, b: _reference_siglip(i, t, s, b), image, text, scale, bias)
    for g, w, name in zip(got, want, ("loss", "d image", "d text", "d scale", "d bias")):
        _assert_close(g, w, name)


def test_losses_match_open_clip():
    from open_clip.loss import ClipLoss, SigLipLoss

    image, text = _features(40, 16, seed=6)
    scale, bias = torch.tensor([14.3]), torch.tensor([-10.0])
    for loss_fn in (infonce, infonce_tiled):
        _assert_close(loss_fn(image, text, scale), ClipLoss()(image, text, scale), loss_fn.__name__)
    _assert_close(siglip(image, text, scale, bias), SigLipLoss()(image, text, scale, bias), "siglip")


def test_siglip_without_a_bias_says_how_to_get_one():
    image, text = _features(8, 4, seed=7)
    with pytest.raises(UserError, match="model.init_logit_bias"):
        siglip(image, text, torch.tensor([10.0]), None)


def test_build_loss_follows_the_config():
    image, text = _features(24, 8, seed=8)
    scale, bias = torch.tensor([10.0]), torch.tensor([-5.0])
    cfg = load_config(None, ["loss.name=infonce_tiled", "loss.tile_size=5", "loss.label_smoothing=0.2"]).loss
    fn = build_loss(cfg)
    assert fn.keywords == {"label_smoothing": 0.2, "tile_size": 5}
    _assert_close(fn(image, text, scale, bias), _reference_infonce(image, text, scale, 0.2), "infonce_tiled")
    fn = build_loss(LossConfig(name="siglip"))
    _assert_close(fn(image, text, scale, bias), _reference_siglip(image, text, scale, bias), "siglip")
    fn = build_loss(LossConfig(name="infonce", label_smoothing=0.1))
    _assert_close(fn(image, text, scale, bias), _reference_infonce(image, text, scale, 0.1), "infonce")


@pytest.mark.parametrize("override,message", [
    ("loss.name=clip", "loss.name must be one of infonce, infonce_tiled, siglip"),
    ("loss.tile_size=0", "loss.tile_size must be > 0"),
    ("loss.label_smoothing=1.0", r"loss.label_smoothing must be in \[0, 1\)"),
])
def test_loss_config_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_siglip_refuses_label_smoothing():
    with pytest.raises(ConfigError, match="not siglip"):
        load_config(None, ["loss.name=siglip", "loss.label_smoothing=0.1"])


# ---------------------------------------------------------------- several ranks
#
# What "equal" means across ranks. Each rank returns its local loss; under DDP/DeepSpeed gradients are
# AVERAGED over ranks. So for features (each row lives on one rank), the gradient a rank gets from its own
# loss -- including, through the summing backward of the all-gather/exchange, the terms of other ranks'
# losses that used its features -- divided by the world size must equal the single-process gradient of
# the global loss for those rows. The logit scale and bias are replicated: their per-rank gradients differ,
# and their mean over ranks must equal the single-process gradient. The mean of the local losses must
# equal the global loss.

NUM_PER_RANK, DIM = 12, 16
SCALE, BIAS = 20.0, -4.0
CASES = {  # name -> (loss function, kwargs, uses the bias)
    "infonce": (infonce, {}, False),
    "infonce_smooth": (infonce, {"label_smoothing": 0.1}, False),
    "infonce_tiled": (infonce_tiled, {"tile_size": 5}, False),
    "infonce_tiled_smooth": (infonce_tiled, {"tile_size": 8, "label_smoothing": 0.1}, False),
    "siglip": (siglip, {}, True),
    # Identical captions as positives: keys repeat every 5 rows, so duplicates sit on different ranks too.
    "infonce_positives": (infonce, {"positive_keys_B": None}, False),
    "infonce_positives_smooth": (infonce, {"positive_keys_B": None, "label_smoothing": 0.1}, False),
}


def _keys(index) -> torch.Tensor:
    return torch.tensor(index) % 5


def _with_keys(kwargs: dict, keys: torch.Tensor) -> dict:
    return dict(kwargs, positive_keys_B=keys) if "positive_keys_B" in kwargs else kwargs


def _rank_body(rank, world_size, image_GD, text_GD, subgroups):
    """Every case on this rank's slice of the global batch (and, if asked, in pairs of ranks)."""
    import torch.distributed as dist

    results = {}
    groups = [(None, list(range(world_size)))]
    if subgroups:  # ranks {0, 2} and {1, 3}: group ranks differ from global ranks
        pairs = [[0, 2], [1, 3]]
        handles = [dist.new_group(p) for p in pairs]
        groups.append(next((h, p) for h, p in zip(handles, pairs) if rank in p))
    for group, members in groups:
        pos = members.index(rank)
        rows = slice(pos * NUM_PER_RANK, (pos + 1) * NUM_PER_RANK)
        image = image_GD[[m * NUM_PER_RANK + i for m in members for i in range(NUM_PER_RANK)]][rows]
        text = text_GD[[m * NUM_PER_RANK + i for m in members for i in range(NUM_PER_RANK)]][rows]
        keys = _keys([m * NUM_PER_RANK + i for m in members for i in range(NUM_PER_RANK)])[rows]
        for name, (loss_fn, kwargs, uses_bias) in CASES.items():
            bias = torch.tensor([BIAS]) if uses_bias else None
            results[(name, tuple(members))] = _grads(loss_fn, image, text, torch.tensor([SCALE]), bias,
                                                      group=group, **_with_keys(kwargs, keys))
        # Ranks weighting their losses differently (as a loss scaler or an extra term might): the tiled
        # loss must give each rank exactly the gradients plain autograd through the all-gather gives.
        weight = float(pos + 1)
        for name, loss_fn in (("infonce", infonce), ("infonce_tiled", infonce_tiled)):
            results[(name + "_weighted", tuple(members))] = _grads(
                lambda *a, **k: weight * loss_fn(*a, **k), image, text, torch.tensor([SCALE]), group=group)
    return results


def _check_against_one_process(results, image_GD, text_GD, members):
    world = len(members)
    index = [m * NUM_PER_RANK + i for m in members for i in range(NUM_PER_RANK)]
    image, text = image_GD[index], text_GD[index]
    scale, bias = torch.tensor([SCALE]), torch.tensor([BIAS])
    for name, (loss_fn, kwargs, uses_bias) in CASES.items():
        want = _grads(loss_fn, image, text, scale, bias if uses_bias else None, **_with_keys(kwargs, _keys(index)))
        per_rank = [results[m][(name, tuple(members))] for m in members]
        what = f"{name} on ranks {members}"
        _assert_close(torch.stack([r[0] for r in per_rank]).mean(), want[0], f"{what}: mean loss")
        _assert_close(torch.cat([r[1] for r in per_rank]) / world, want[1], f"{what}: d image / world")
        _assert_close(torch.cat([r[2] for r in per_rank]) / world, want[2], f"{what}: d text / world")
        _assert_close(torch.stack([r[3] for r in per_rank]).mean(0), want[3], f"{what}: mean d scale")
        if uses_bias:
            _assert_close(torch.stack([r[4] for r in per_rank]).mean(0), want[4], f"{what}: mean d bias")
    for m in members:  # same local-loss semantics: each rank's own loss and feature gradients agree
        for suffix in ("", "_weighted"):
            plain, tiled = results[m][("infonce" + suffix, tuple(members))], results[m][("infonce_tiled" + suffix, tuple(members))]
            for g, w, part in zip(tiled[:3], plain[:3], ("loss", "d image", "d text")):
                _assert_close(g, w, f"rank {m} tiled vs plain{suffix}: {part}")
        plain_w = [results[m][("infonce_weighted", tuple(members))][3] for m in members]
        tiled_w = [results[m][("infonce_tiled_weighted", tuple(members))][3] for m in members]
        _assert_close(sum(tiled_w), sum(plain_w), "weighted: summed d scale")


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_losses_equal_one_process_on_the_concatenated_batch(world_size):
    image_GD, text_GD = _features(world_size * NUM_PER_RANK, DIM, seed=10 + world_size)
    results = run_ranks(_rank_body, world_size=world_size, args=(image_GD, text_GD, world_size == 4))
    _check_against_one_process(results, image_GD, text_GD, list(range(world_size)))
    if world_size == 4:
        for pair in ([0, 2], [1, 3]):
            _check_against_one_process(results, image_GD, text_GD, pair)


def test_a_siglip_model_starts_at_siglip_scale_and_bias_and_trains_both():
    """model.init_logit_scale / init_logit_bias reach the open_clip model; siglip's gradient reaches both."""
    import math

    from contrastive.config import ModelConfig
    from contrastive.models import build_model

    bundle = build_model(ModelConfig(name="tiny-vit-32", init_logit_bias=-10.0, init_logit_scale=math.log(10)))
    model = bundle.model
    size = bundle.model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    out = model(torch.randn(4, 3, size, size), bundle.tokenizer(["a", "b", "c", "d"]))
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-6)
    assert out["logit_bias"].item() == pytest.approx(-10.0)
    siglip(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"]).backward()
    assert model.logit_scale.grad.abs().item() > 0 and model.logit_bias.grad.abs().item() > 0


def test_training_with_the_tiled_loss_follows_the_plain_loss(tmp_path, tiny_overrides):
    """End to end (model, DeepSpeed engine, data, logit-scale clamp): the same seeded run with infonce and
    infonce_tiled logs the same losses."""
    from contrastive.train import train

    def losses(run_dir):
        return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    runs = {}
    for name in ("infonce", "infonce_tiled"):
        cfg = load_config(None, [*tiny_overrides, f"loss.name={name}", "loss.tile_size=12", "train.steps=4",
                                 "train.checkpoint_every=4"])
        train(cfg, tmp_path / name, progress=False)
        runs[name] = losses(tmp_path / name)
    assert len(runs["infonce"]) >= 2
    assert runs["infonce_tiled"] == pytest.approx(runs["infonce"], rel=1e-4)


# ---------------------------------------------------------------- K captions per image (data.captions_per_sample)

def _reference_k_captions(image, text_XD, scale):
    """The K-caption loss written out in float64 with explicit sums: caption (i, k) is row i*K + k; for each k,
    image i's softmax over the B k-th captions and caption (i, k)'s softmax over the B images."""
    image, text, s = image.double(), text_XD.double(), float(scale)
    num, k = image.shape[0], text.shape[0] // image.shape[0]
    total = 0.0
    for c in range(k):
        texts_c = text[c::k]
        for i in range(num):
            row = [s * float(image[i] @ texts_c[j]) for j in range(num)]
            col = [s * float(image[j] @ texts_c[i]) for j in range(num)]
            total += 0.5 * (math.log(sum(math.exp(v) for v in row)) - row[i]) / num
            total += 0.5 * (math.log(sum(math.exp(v) for v in col)) - col[i]) / num
    return total / k


def test_k_captions_loss_matches_the_written_out_sums():
    from contrastive.losses import mean_over_captions

    image, _ = _features(6, 8, seed=3)
    text = F.normalize(torch.randn(18, 8, generator=torch.Generator().manual_seed(4)) + image.repeat_interleave(3, 0), dim=1)
    got = mean_over_captions(infonce, image, text, torch.tensor([7.0]))
    assert abs(got.item() - _reference_k_captions(image, text, 7.0)) < 1e-5
    # K = 1 is the loss itself; a text count that is no multiple of the images is refused.
    assert torch.equal(mean_over_captions(infonce, image, text[:6], torch.tensor([7.0])),
                       infonce(image, text[:6], torch.tensor([7.0])))
    with pytest.raises(ValueError, match="8 texts for 6 images"):
        mean_over_captions(infonce, image, text[:8], torch.tensor([7.0]))


def _k_captions_rank_body(rank, world_size, image_GD, text_GXD, k):
    from contrastive.losses import mean_over_captions

    num = image_GD.shape[0] // world_size
    image, text = image_GD[rank * num:(rank + 1) * num], text_GXD[rank * num * k:(rank + 1) * num * k]
    return {name: _grads(lambda *a, **kw: mean_over_captions(fn, *a, **kw), image, text, torch.tensor([SCALE]),
                         group=None) for name, fn in (("infonce", infonce), ("infonce_tiled", infonce_tiled))}


def test_k_captions_loss_on_two_ranks_equals_one_process():
    from contrastive.losses import mean_over_captions

    k = 3
    image, _ = _features(2 * NUM_PER_RANK, DIM, seed=21)
    text = F.normalize(torch.randn(2 * NUM_PER_RANK * k, DIM, generator=torch.Generator().manual_seed(22))
                       + image.repeat_interleave(k, 0), dim=1)
    results = run_ranks(_k_captions_rank_body, world_size=2, args=(image, text, k))
    want = _grads(lambda *a, **kw: mean_over_captions(infonce, *a, **kw), image, text, torch.tensor([SCALE]))
    _assert_close(want[0], torch.tensor(_reference_k_captions(image, text, SCALE), dtype=want[0].dtype), "reference")
    for name in ("infonce", "infonce_tiled"):
        per_rank = [results[r][name] for r in range(2)]
        _assert_close(torch.stack([r[0] for r in per_rank]).mean(), want[0], f"{name}: mean loss")
        _assert_close(torch.cat([r[1] for r in per_rank]) / 2, want[1], f"{name}: d image / world")
        _assert_close(torch.cat([r[2] for r in per_rank]) / 2, want[2], f"{name}: d text / world")
        _assert_close(torch.stack([r[3] for r in per_rank]).mean(0), want[3], f"{name}: mean d scale")
