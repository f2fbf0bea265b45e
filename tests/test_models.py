"""The model registry: shapes, the paper's PreActResNet18, [0, 1] inputs."""

import pytest
import torch
from torch import nn

from mapprune.errors import MapPruneError
from mapprune.models import MODELS, Normalized, create_model
from mapprune.models.preactresnet import PreActResNet18


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (1, 28, 28)])
def test_output_shape(name, shape):
    if name == "vgg16_bn" and shape[1] < 32:
        pytest.skip("VGG-16 pools five times: it needs images of at least 32x32")
    torch.manual_seed(0)
    model = create_model(name, 7, width=4, in_channels=shape[0]).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert isinstance(model, Normalized) and convs(model)[0].in_channels == shape[0]


def test_preactresnet18_width_64_is_the_papers():
    model = create_model("preactresnet18", 10, width=64)
    c = convs(model)
    assert len(c) == 20  # stem + 16 block convs + 3 shortcut convs
    assert sum(m.out_channels for m in c) == 4800
    assert [m.out_channels for m in c[:1]] == [64] and model.net.linear.in_features == 512
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)


def test_width_scales_channels():
    assert sum(m.out_channels for m in convs(create_model("preactresnet18", 10, width=16))) == 4800 // 4


def test_default_widths():
    assert convs(create_model("preactresnet18", 10))[0].out_channels == 64
    assert convs(create_model("smallcnn", 10, in_channels=1))[0].out_channels == 32


def test_unknown_model_lists_valid_names():
    with pytest.raises(MapPruneError) as e:
        create_model("resnet50", 10)
    msg = str(e.value)
    assert "unknown model 'resnet50'" in msg and all(n in msg for n in MODELS)


@pytest.mark.parametrize("width", [0, -3])
def test_bad_width(width):
    with pytest.raises(MapPruneError, match="width must be a positive integer"):
        create_model("smallcnn", 10, width=width)


def test_model_takes_unit_pixels_and_normalises_inside():
    torch.manual_seed(0)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    model = create_model("smallcnn", 10, width=4, in_channels=3, mean=mean, std=std).eval()
    x = torch.rand(3, 3, 16, 16)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - m) / s), atol=1e-6)
    # mean and std travel with the weights
    state = model.state_dict()
    assert torch.equal(state["mean"].flatten(), torch.tensor(mean)) and "std" in state
    assert "net.features.0.weight" in state  # the inner network's names read net.<module>


def test_grayscale_model_keeps_one_channel_of_statistics():
    model = create_model("preactresnet18", 10, width=4, in_channels=1, mean=(0.3, 0.3, 0.3), std=(0.2, 0.2, 0.2))
    assert model.mean.shape == (1, 1, 1, 1) and model.std.shape == (1, 1, 1, 1)


def test_preactresnet_class_directly():
    net = PreActResNet18(num_classes=43, width=8)
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 43)


def test_tiny_strided_shortcuts_are_guarded_and_compute_the_same_gradients():
    """A width-4 ResNet's 4 -> 8 stride-2 shortcut goes through the standard-layout guard (a oneDNN CPU bug corrupts
    the heap there in channels_last); the guarded layer's gradients equal a plain convolution's, and a
    channels_last training step of the whole model runs."""
    from mapprune.models.conv_guard import StandardLayoutConv2d

    model = create_model("preactresnet18", 10, width=4)
    guarded = [m for m in model.modules() if isinstance(m, StandardLayoutConv2d)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in guarded] == [(4, 8, (2, 2))]
    assert all(type(m) is nn.Conv2d for m in create_model("preactresnet18", 10, width=8).modules()
               if isinstance(m, nn.Conv2d))  # nothing to guard from width 8 up

    torch.manual_seed(0)
    plain = nn.Conv2d(4, 8, 1, stride=2, bias=False)
    guard = StandardLayoutConv2d(4, 8, 1, stride=2, bias=False)
    guard.load_state_dict(plain.state_dict())
    guard = guard.to(memory_format=torch.channels_last)
    x = torch.rand(8, 4, 16, 16)
    plain(x).square().sum().backward()
    xg = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    guard(xg).square().sum().backward()
    assert torch.allclose(guard.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)

    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.rand(16, 3, 32, 32).contiguous(
            memory_format=torch.channels_last)), torch.arange(16) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
