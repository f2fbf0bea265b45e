"""`mapprune demo`: the repaired model really loses the backdoor and keeps its clean accuracy."""

from mapprune.jobs.demo import demo


def test_demo_repairs_the_backdoor(tmp_path, capsys):
    before, after = demo(out=tmp_path / "demo", progress=False)
    assert before["asr"] > 0.9
    assert after["asr"] <= 0.05, after
    assert after["acc"] >= before["acc"] - 0.02, (before, after)
    assert "after FMT" in capsys.readouterr().out
