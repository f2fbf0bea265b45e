"""FMT beyond convolutions: the ViT of the registry, feature maps of nn.Linear layers (channel last), their
testing (fast = reference), pruning and masking, and FMT's repair of a ViT end to end."""

import pytest
import torch
from torch import nn

from mapprune.defenses import FMT
from mapprune.defenses.pruning import PruneMask, prune
from mapprune.errors import MapPruneError
from mapprune.models import MODELS, create_model
from mapprune.probes import adversarial_for_map, channel_dim, conv_layers, map_layers, num_maps, probe_feature_maps


def _vit(width=4, in_channels=3, seed=0):
    torch.manual_seed(seed)
    return create_model("vit", 10, width=width, in_channels=in_channels).eval()


def _images_and_own_labels(model, n, shape, seed=1):
    """Smooth random images labelled with the model's own predictions (clean accuracy 100%)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand(n, c, max(1, h // 8), max(1, w // 8), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").clamp(0, 1)
    x = (x + 0.1 * torch.rand(x.shape, generator=g)).clamp(0, 1)  # some fine detail, so patches see something
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def _output(model, layer, x, grad=False):
    """``layer``'s output when ``model`` runs on x."""
    box = []
    handle = layer.register_forward_hook(lambda m, i, o: box.append(o))  # append returns None: output kept
    with torch.set_grad_enabled(grad):
        model(x)
    handle.remove()
    return box[0]


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (3, 8, 8), (1, 28, 28)])
def test_vit_builds_and_runs_on_cifar_and_digits_shapes(shape):
    model = _vit(in_channels=shape[0])
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    grid = {32: 8, 8: 4, 28: 7}[shape[1]]  # patch 4; 8x8 digits: patch 2 (upsampled x2)
    assert _output(model, model.net.blocks[0].attn.q, torch.rand(2, *shape)).shape == (2, grid * grid, 8)  # dim = 2 x width


def test_vit_width_and_default_size():
    assert isinstance(MODELS["vit"](), nn.Module)
    model = create_model("vit", 10)
    assert model.net.embed.out_channels == 128 and len(model.net.blocks) == 4  # width 64 -> dim 128
    assert model.net.blocks[0].mlp.fc1.out_features == 256 and model.net.blocks[0].attn.heads == 4
    assert create_model("vit", 10, width=3).net.blocks[0].attn.heads == 2  # dim 6: the heads that divide it


def test_map_layers_cnns_unchanged_vit_linears_without_head():
    for name in ("preactresnet18", "resnet18", "vgg16_bn", "smallcnn"):
        model = create_model(name, 10, width=4)
        assert list(map_layers(model)) == list(conv_layers(model)), name
    vit = _vit()
    layers = map_layers(vit)
    assert list(layers)[:7] == ["net.embed", "net.blocks.0.attn.q", "net.blocks.0.attn.k", "net.blocks.0.attn.v",
                                "net.blocks.0.attn.proj", "net.blocks.0.mlp.fc1", "net.blocks.0.mlp.fc2"]
    assert len(layers) == 1 + 6 * 4 and "net.head" not in layers
    fc1 = layers["net.blocks.0.mlp.fc1"]
    assert num_maps(fc1) == 16 and channel_dim(fc1) == -1 and channel_dim(layers["net.embed"]) == 1


class _TorchAttention(nn.Module):
    """Pixels as tokens through torch's own nn.MultiheadAttention, which uses its out_proj's weights without
    calling it: that Linear never runs as a module, so it is not testable."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))  # (N, H*W, 8)
        return self.head(self.attn(t, t, t)[0].mean(1))


def test_multihead_attention_projections_are_left_out():
    torch.manual_seed(0)
    model = _TorchAttention().eval()
    assert list(map_layers(model)) == ["embed"]
    x, y = _images_and_own_labels(model, 4, (3, 4, 4))
    fast = probe_feature_maps(model, x, y, eps=0.2, batch_images=8, keep_probs=True)
    ref = probe_feature_maps(model, x, y, eps=0.2, implementation="reference", keep_probs=True)
    assert list(fast.acc) == ["embed"] and fast.acc["embed"].shape == (8,)
    torch.testing.assert_close(fast.probs["embed"], ref.probs["embed"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", ["mse", "patch", "excite", "smooth"])
def test_fast_equals_reference_on_vit(objective):
    model = _vit()
    x, y = _images_and_own_labels(model, 6, (3, 32, 32))
    kw = {"eps": 0.1, "alpha": 0.02, "seed": 1, "objective": objective, "keep_probs": True}
    # batch_images=18: chunks of 3 maps, so chunk edges and remainders are exercised.
    fast = probe_feature_maps(model, x, y, implementation="fast", batch_images=18, **kw)
    ref = probe_feature_maps(model, x, y, implementation="reference", **kw)
    assert list(fast.acc) == list(ref.acc) == list(map_layers(model))
    assert "net.blocks.3.mlp.fc2" in fast.acc and "net.head" not in fast.acc
    for name, layer in map_layers(model).items():
        assert fast.acc[name].shape == (num_maps(layer),)
        # Unlike a conv's, the attention's batched backward does not round exactly as the per-map one: an input
        # gradient within rounding of zero (1e-12 of the largest) can take the other sign, and that one pixel moves
        # by 2 eps. It moves the probabilities by ~5e-5, hence atol 1e-4 rather than the CNN tests' 1e-5.
        torch.testing.assert_close(fast.probs[name], ref.probs[name], rtol=1e-4, atol=1e-4, msg=f"layer {name}")
        if objective == "patch":
            assert torch.equal(fast.candidates[name].pos, ref.candidates[name].pos)
            assert torch.equal(fast.candidates[name].window, ref.candidates[name].window)
    if objective == "mse":
        scores = torch.cat(list(ref.acc.values()))
        assert scores.std() > 0, "scores must vary between maps for this comparison to mean anything"


def test_fast_equals_reference_on_vit_digits():
    model = _vit(in_channels=1)
    x, y = _images_and_own_labels(model, 8, (1, 8, 8))
    fast = probe_feature_maps(model, x, y, eps=0.2, seed=2, batch_images=16, keep_probs=True)
    ref = probe_feature_maps(model, x, y, eps=0.2, seed=2, implementation="reference", keep_probs=True)
    for name in ref.acc:
        torch.testing.assert_close(fast.probs[name], ref.probs[name], rtol=1e-4, atol=1e-4, msg=f"layer {name}")
    assert torch.cat(list(ref.acc.values())).std() > 0


def test_a_linear_map_is_its_channel_over_all_tokens():
    """The excite step on a Linear map is the signed gradient of out[..., c] averaged over images and tokens."""
    model = _vit()
    x, _ = _images_and_own_labels(model, 3, (3, 32, 32))
    layer, c = model.net.blocks[1].mlp.fc1, 5
    x0 = x.clone().requires_grad_(True)
    out = _output(model, layer, x0, grad=True)
    assert out.shape == (3, 64, 16)
    (grad,) = torch.autograd.grad(out[:, :, c].mean(), x0)
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(adversarial_for_map(model, layer, x, x, c, 0.05, "excite"), expected)


def test_pruning_a_linear_channel_zeroes_it_and_the_mask_keeps_it_zero():
    model = _vit()
    fc1, v = model.net.blocks[0].mlp.fc1, model.net.blocks[1].attn.v
    mask = prune(model, {"net.blocks.0.mlp.fc1": [3], "net.blocks.1.attn.v": [0, 5]}, torch.rand(1, 3, 32, 32))
    assert fc1.weight[3].abs().sum() == 0 and fc1.bias[3] == 0 and v.weight[[0, 5]].abs().sum() == 0
    x = torch.rand(4, 3, 32, 32)
    out = _output(model, fc1, x)
    assert out[..., 3].abs().max() == 0 and out[..., 2].abs().max() > 0
    assert _output(model, v, x)[..., [0, 5]].abs().max() == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.rand(8, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        # No BatchNorm gamma blocks the gradient of a Linear row: it regrows unless masked.
        assert fc1.weight[3].abs().sum() > 0
        mask(model)
    model.eval()
    assert _output(model, fc1, torch.rand(4, 3, 32, 32))[..., 3].abs().max() == 0
    assert _output(model, v, torch.rand(4, 3, 32, 32))[..., [0, 5]].abs().max() == 0
    with pytest.raises(MapPruneError, match="not a Conv2d or nn.Linear"):
        PruneMask(model, {"net.blocks.0.norm1": [0]}, {})


def test_fmt_repairs_a_vit_and_prunes_linear_channels_by_name():
    model = _vit()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(10).repeat(6)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    # The rank rule (one map per layer here): an untrained ViT predicts one class for every image, so every map
    # ties and the global rule, which never prunes a tied map, would prune nothing.
    fmt = FMT(n_images=8, epochs=1, batch_size=16, hflip=False, selection="rank", batch_images=64)
    result = fmt.repair(model, x, y)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items()), "input model untouched"
    assert list(result.scores) == list(map_layers(model))
    assert result.num_pruned == len(map_layers(model))
    modules = dict(result.model.named_modules())
    linear = [name for name, channels in result.pruned.items() if channels and isinstance(modules[name], nn.Linear)]
    assert linear, result.pruned
    for name, channels in result.pruned.items():  # recommended recipe: masked through the fine-tune
        assert modules[name].weight[channels].abs().sum() == 0, name
    assert len(result.history) == 1 and result.extra["unlearning"]["maps"]


def test_a_model_of_only_a_head_has_nothing_to_test():
    with pytest.raises(MapPruneError, match="no Conv2d"):
        map_layers(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    assert list(map_layers(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)))) == ["1"]
