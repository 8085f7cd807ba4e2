import numpy as np
import onnx
import pytest

from scap_onnx.calibration.data import feeds_from_ids, model_inputs, open_data
from scap_onnx.errors import ScapError


def _proto(p):
    return onnx.load(str(p), load_external_data=False)


def test_decoder_feeds_from_text(tiny):
    m = _proto(tiny["decoder"])
    ds = open_data(tiny["calib"], m, tiny["decoder"], seq_len=32, max_tokens=128, batch_size=2)
    batches = list(ds.batches())
    assert sum(n for _, n in batches) == 128 and len(batches) == 2
    feeds = batches[0][0]
    assert feeds["input_ids"].shape == (2, 32) and feeds["input_ids"].dtype == np.int64
    assert (feeds["attention_mask"] == 1).all() and feeds["attention_mask"].shape == (2, 32)
    assert (feeds["position_ids"][1] == np.arange(32)).all()
    assert feeds["past_key_values.1.value"].shape == (2, 2, 0, 4)


def test_encoder_windows_carry_special_tokens(tiny):
    m = _proto(tiny["encoder"])
    ds = open_data(tiny["jsonl"], m, tiny["encoder"], seq_len=16, max_tokens=64)
    feeds, n = next(iter(ds.batches()))
    ids = feeds["input_ids"][0]
    assert ids[0] == 1 and ids[-1] == 2  # [CLS] ... [SEP]
    assert (feeds["token_type_ids"] == 0).all()


def test_skip_tokens_holds_out(tiny):
    m = _proto(tiny["decoder"])
    a = next(iter(open_data(tiny["calib"], m, tiny["decoder"], seq_len=32, max_tokens=32).batches()))[0]
    b = next(iter(open_data(tiny["calib"], m, tiny["decoder"], seq_len=32, max_tokens=32, skip_tokens=64).batches()))[0]
    assert not np.array_equal(a["input_ids"], b["input_ids"])


def test_npz_feeds(tiny, tmp_path):
    m = _proto(tiny["decoder"])
    ids = np.random.default_rng(0).integers(0, 40, (5, 8))
    feeds = feeds_from_ids(model_inputs(m), ids)
    np.savez(tmp_path / "f.npz", **feeds)
    ds = open_data(tmp_path / "f.npz", m, tiny["decoder"], batch_size=2)
    got = list(ds.batches())
    assert [f["input_ids"].shape[0] for f, _ in got] == [2, 2, 1]
    np.savez(tmp_path / "bad.npz", input_ids=ids)
    with pytest.raises(ScapError, match="lacks feeds"):
        list(open_data(tmp_path / "bad.npz", m, tiny["decoder"]).batches())


def test_missing_tokenizer(tiny, tmp_path):
    import shutil

    shutil.copy(tiny["decoder"], tmp_path / "model.onnx")
    with pytest.raises(ScapError, match="no tokenizer"):
        open_data(tiny["calib"], _proto(tiny["decoder"]), tmp_path / "model.onnx")
    with pytest.raises(ScapError, match="no tokenizer"):
        open_data(tiny["calib"], _proto(tiny["decoder"]), tmp_path / "model.onnx", tokenizer=tmp_path)
    # an explicit tokenizer folder works
    ds = open_data(tiny["calib"], _proto(tiny["decoder"]), tmp_path / "model.onnx", tokenizer=tiny["decoder"].parent)
    assert next(iter(ds.batches()))[1] > 0


def test_bad_data_files(tiny, tmp_path):
    m = _proto(tiny["decoder"])
    with pytest.raises(ScapError, match="does not exist"):
        open_data(tmp_path / "nope.txt", m, tiny["decoder"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ScapError, match="expected a text file"):
        open_data(tmp_path / "x.csv", m, tiny["decoder"])
    (tmp_path / "short.txt").write_text("the of")
    with pytest.raises(ScapError, match="fewer than"):
        list(open_data(tmp_path / "short.txt", m, tiny["decoder"], seq_len=64).batches())
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ScapError, match='"text"'):
        list(open_data(tmp_path / "bad.jsonl", m, tiny["decoder"], seq_len=4).batches())


def test_spread_sampling_covers_the_file(tiny, tmp_path):
    # a long file whose quarters use different words: spread windows see all quarters
    from tiny_models import WORDS, write_tokenizer

    quarters = [WORDS[i::4] for i in range(4)]
    rng = np.random.default_rng(0)
    text = "".join(" ".join(rng.choice(q, 20000)) + "\n" for q in quarters)  # four very long lines
    (tmp_path / "m").mkdir()
    import shutil

    shutil.copy(tiny["decoder"], tmp_path / "m" / "model.onnx")
    write_tokenizer(tmp_path / "m", bert=False)
    (tmp_path / "t.txt").write_text(text)
    m = _proto(tiny["decoder"])
    model = tmp_path / "m" / "model.onnx"
    ds = open_data(tmp_path / "t.txt", m, model, seq_len=16, max_tokens=16 * 8)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    seen = set()
    for feeds, _ in ds.batches():
        words = tok.decode(feeds["input_ids"][0].tolist()).split()
        seen |= {i for i, q in enumerate(quarters) if words[0] in q}
    assert seen == {0, 1, 2, 3}
    contiguous = open_data(tmp_path / "t.txt", m, model, seq_len=16, max_tokens=16 * 8, sampling="contiguous")
    first = {tuple(f["input_ids"][0]) for f, _ in contiguous.batches()}
    a = {tuple(f["input_ids"][0]) for f, _ in ds.batches()}
    held = {tuple(f["input_ids"][0]) for f, _ in open_data(tmp_path / "t.txt", m, model, seq_len=16,
                                                             max_tokens=16 * 8, phase=0.5).batches()}
    assert len(a) == 8 and len(held) == 8 and not a & held and a != first


def test_spread_falls_back_on_short_files(tiny):
    m = _proto(tiny["decoder"])
    spread = [f["input_ids"] for f, _ in open_data(tiny["calib"], m, tiny["decoder"], seq_len=64, max_tokens=64 * 400).batches()]
    contiguous = [f["input_ids"] for f, _ in open_data(tiny["calib"], m, tiny["decoder"], seq_len=64, max_tokens=64 * 400,
                                                       sampling="contiguous").batches()]
    assert all((a == b).all() for a, b in zip(spread, contiguous)) and len(spread) == len(contiguous)


def test_several_text_files_are_mixed(tiny, tmp_path):
    m = _proto(tiny["decoder"])
    ds = open_data([tiny["calib"], tiny["eval"]], m, tiny["decoder"], seq_len=32, max_tokens=5 * 32, batch_size=2)
    batches = list(ds.batches())
    assert [n for _, n in batches] == [64, 64, 32]
    got = [row for f, _ in batches for row in f["input_ids"]]

    def alone(path, windows):
        return [f["input_ids"][0] for f, _ in open_data(path, m, tiny["decoder"], seq_len=32,
                                                        max_tokens=windows * 32).batches()]

    a, b = alone(tiny["calib"], 3), alone(tiny["eval"], 2)  # 5 windows: 3 + 2, taken in turn
    for x, y in zip(got, [a[0], b[0], a[1], b[1], a[2]], strict=True):
        assert np.array_equal(x, y)
    assert [d["path"] for d in ds.describe()["mix"]] == [str(tiny["calib"]), str(tiny["eval"])]
    # one file in a list is that file
    one = open_data([tiny["calib"]], m, tiny["decoder"], seq_len=32, max_tokens=64)
    assert one.describe()["path"] == str(tiny["calib"])

    ids = np.random.default_rng(0).integers(0, 40, (2, 8))
    np.savez(tmp_path / "f.npz", **feeds_from_ids(model_inputs(m), ids))
    with pytest.raises(ScapError, match="only text files can be mixed"):
        open_data([tiny["calib"], tmp_path / "f.npz"], m, tiny["decoder"], seq_len=32, max_tokens=128)
    with pytest.raises(ScapError, match="fewer windows"):
        open_data([tiny["calib"], tiny["eval"]], m, tiny["decoder"], seq_len=32, max_tokens=32)
