"""Users' own triggers: a patch or blend pattern from an image file, stored in the run so it reloads without the
file; a user's Attack subclass registered by name; bad trigger input refused before any work."""

import numpy as np
import pytest
import torch

from mapprune.attacks import ATTACKS, Attack, PatchAttack, create_attack, register_attack
from mapprune.errors import MapPruneError


def _png(path, array):
    from PIL import Image

    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def test_patch_pastes_the_pattern_through_its_mask_where_asked():
    pattern = torch.ones(3, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    atk = PatchAttack((3, 6, 6), 10, pattern=pattern, mask=mask, position=(1, 2))
    out = atk.trigger(torch.zeros(2, 3, 6, 6))
    assert out[:, :, 1, 2].eq(1).all() and out[:, :, 1, 3].eq(0).all() and out[:, :, 2, 2].eq(0.5).all()
    assert float(out.sum()) == 2 * 3 * 2.5  # nothing outside the patch changed
    corner = PatchAttack((3, 6, 6), 10, pattern=pattern).trigger(torch.zeros(1, 3, 6, 6))
    assert corner[0, :, 4:, 4:].eq(1).all() and float(corner.sum()) == 12  # default: the bottom-right corner


def test_random_position_moves_the_patch_per_image_and_is_seeded():
    atk = PatchAttack((1, 16, 16), 10, pattern=torch.ones(1, 3, 3), position="random")
    out = atk.trigger(torch.zeros(8, 1, 16, 16))
    assert all(float(o.sum()) == 9 for o in out)
    places = {tuple(torch.nonzero(o[0])[0].tolist()) for o in out}
    assert len(places) > 1
    assert torch.equal(out, atk.trigger(torch.zeros(8, 1, 16, 16)))


def test_a_patch_run_reloads_without_the_image_files(tmp_path):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    pattern = _png(tmp_path / "logo.png", [[255, 0], [0, 255]])
    mask = _png(tmp_path / "mask.png", [[255, 255], [255, 0]])
    out = tmp_path / "run"
    m = attack_run("patch", out, dataset="digits", preset="demo", progress=False, epochs=2,
                   attack_kw={"pattern": str(pattern), "mask": str(mask), "position": [0, 0]})
    assert m["attack"]["pattern_file"] == "logo.png" and m["attack"]["position"] == [0, 0]
    pattern.unlink()
    mask.unlink()
    run = load_run(out)
    x = torch.zeros(1, 1, 8, 8)
    stamped = run.attack.trigger(x)[0, 0]
    assert stamped[0, 0] == 1 and stamped[0, 1] == 0 and stamped[1, 1] == 0 and float(stamped.sum()) == 1


def test_blended_takes_a_user_pattern_resized_and_keeps_it(tmp_path):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    img = _png(tmp_path / "kitty.png", np.full((20, 20, 3), 200))
    atk = create_attack("blended", (3, 8, 8), 10, pattern=str(img), alpha=0.5)
    assert atk.pattern.shape == (3, 8, 8) and torch.allclose(atk.pattern, torch.full((3, 8, 8), 200 / 255))
    assert atk.params()["pattern_file"] == "kitty.png"
    out = tmp_path / "run"
    attack_run("blended", out, dataset="digits", preset="demo", progress=False, epochs=1,
               attack_kw={"pattern": str(img), "alpha": 0.5})
    img.unlink()
    run = load_run(out)
    torch.testing.assert_close(run.attack.trigger(torch.zeros(1, 1, 8, 8)), torch.full((1, 1, 8, 8), 0.5 * 200 / 255))


@pytest.mark.parametrize("kw, msg", [
    ({"pattern": "missing.png"}, "does not exist"),
    ({"pattern": "junk"}, "cannot read"),
    ({"pattern": "big"}, "does not fit"),
    ({"pattern": "small", "mask": "wrong"}, "mask is"),
    ({"pattern": "small", "position": (7, 0)}, "leaves the"),
    ({"pattern": "small", "position": (-1, 0)}, "leaves the"),
    ({"pattern": "small", "position": "corner"}, "row, col"),
    ({"mask": "wrong"}, "needs its pattern"),
])
def test_bad_trigger_input_is_one_clear_error(tmp_path, kw, msg):
    files = {"junk": tmp_path / "junk.png", "big": _png(tmp_path / "big.png", np.zeros((10, 10))),
             "small": _png(tmp_path / "small.png", np.zeros((2, 2))), "wrong": _png(tmp_path / "wrong.png",
                                                                                     np.zeros((3, 3)))}
    files["junk"].write_bytes(b"not an image")
    kw = {k: str(files.get(v, tmp_path / v)) if k in ("pattern", "mask") else v for k, v in kw.items()}
    with pytest.raises(MapPruneError, match=msg):
        PatchAttack((1, 8, 8), 10, **kw)


def test_cli_patch_flags_fail_before_training(tmp_path, capsys):
    from mapprune.cli import main

    assert main(["attack", "patch", "--dataset", "digits", "--preset", "demo", "--out", str(tmp_path / "r"),
                 "--pattern", str(tmp_path / "nope.png"), "--position", "0,0"]) != 0
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["attack", "badnets", "--dataset", "digits", "--preset", "demo", "--out", str(tmp_path / "b"),
                 "--pattern", str(_png(tmp_path / "p.png", np.zeros((2, 2))))]) != 0
    assert "pattern" in capsys.readouterr().err


def test_loading_a_state_never_sets_arbitrary_attributes():
    atk = create_attack("blended", (3, 8, 8), 10)
    with pytest.raises(MapPruneError, match="unexpected entries"):
        atk.load_state({"pattern": torch.zeros(3, 8, 8), "trigger": torch.zeros(1)})
    assert callable(atk.trigger)
    with pytest.raises(MapPruneError, match="unexpected entries"):
        create_attack("badnets", (3, 8, 8), 10).load_state({"__class__": torch.zeros(1)})


def test_a_users_attack_registers_and_its_run_reloads_by_name(tmp_path):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    @register_attack
    class Stripe(Attack):
        name = "test-stripe"

        def __init__(self, image_shape, num_classes, *, row: int = 0, **kw):
            super().__init__(image_shape, num_classes, **kw)
            self.row = row

        def params(self):
            return {"row": self.row}

        def trigger(self, x):
            x = x.clone()
            x[:, :, self.row] = 1.0
            return x

    try:
        attack_run("test-stripe", tmp_path / "run", dataset="digits", preset="demo", progress=False, epochs=1,
                   attack_kw={"row": 3})
        run = load_run(tmp_path / "run")
        assert isinstance(run.attack, Stripe) and run.attack.row == 3
        with pytest.raises(MapPruneError, match="registered already"):
            register_attack(type("Other", (Attack,), {"name": "test-stripe"}))
        with pytest.raises(MapPruneError, match="Attack subclass"):
            register_attack(int)
    finally:
        ATTACKS.pop("test-stripe", None)


def test_the_documented_attack_class_example_runs():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "attacks.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```python\n")[1:]]
    (code,) = [b for b in blocks if "@register_attack" in b]
    try:
        exec(compile(code, "docs/attacks.md", "exec"), {})
        atk = create_attack("stripe", (3, 8, 8), 10, row=3)
        out = atk.trigger(torch.zeros(2, 3, 8, 8))
        assert out[:, :, 3].eq(1).all() and float(out.sum()) == 2 * 3 * 8
        atk.load_state(atk.state())
    finally:
        ATTACKS.pop("stripe", None)
