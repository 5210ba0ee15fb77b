"""Signed engines: `ember build --sign-key` and `Engine.load(verify_key=...)` / `--verify-key` let a
deployment refuse engines it did not build."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

import ember
from ember.cli.main import main
from ember.errors import EmberError, EngineFileError
from ember.runtime.format import read_engine
from ember.runtime.signing import EngineSignatureError, SigningKeyError, load_key, sign, verify

from .engine_crafting import craft, members, recompute, write
from .helpers import add_mul_model, save

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "examples", "digits")
KEY = b"0123456789abcdef0123456789abcdef"


def _key_file(path, key: bytes = KEY, mode: int = 0o600):
    path.write_bytes(key + b"\n")
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("signing")
    eng = ember.build(save(add_mul_model(), d / "m.onnx"), device="cpu")
    signed, unsigned = d / "signed.engine", d / "unsigned.engine"
    eng.save(signed, sign_key=KEY)
    eng.save(unsigned)
    return signed, unsigned


def test_signed_engine_loads_with_its_key(built, tmp_path):
    signed, _ = built
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    for key in (KEY, _key_file(tmp_path / "k"), str(_key_file(tmp_path / "k2"))):
        eng = ember.Engine.load(signed, verify_key=key)
        np.testing.assert_allclose(eng.run({"x": x})["y"], (x + np.array([0.5, -1, 2, 3], np.float32)) * x, rtol=1e-6)
    assert json.loads(members(signed)["digest.json"])["signature"]["algorithm"] == "hmac-sha256"


def test_signed_engine_is_refused_without_a_key(built):
    with pytest.raises(EngineSignatureError, match=r"is signed: .*Pass the key: Engine.load\(path, verify_key="):
        ember.Engine.load(built[0])
    # reading it (ember inspect) needs no key: nothing of it runs
    assert read_engine(built[0]).signed


def test_signed_engine_is_refused_with_another_key(built):
    with pytest.raises(EngineSignatureError, match="signature does not match the verify key"):
        ember.Engine.load(built[0], verify_key=b"another key, 32 bytes long......")


def test_unsigned_engine_is_refused_when_a_key_is_given(built):
    with pytest.raises(EngineSignatureError, match="is not signed, and this load accepts only engines signed"):
        ember.Engine.load(built[1], verify_key=KEY)
    assert ember.Engine.load(built[1]).run({"x": np.ones((1, 4), np.float32)})  # no key: unsigned loads


@pytest.mark.parametrize("tamper", ["weights", "manifest", "kernel", "strip"])
def test_tampered_signed_engine_is_refused(built, tmp_path, tamper):
    """The tamperer recomputes every hash and the digest; only the signature is beyond them."""
    signed = built[0]
    p = tmp_path / "t.engine"
    if tamper == "weights":
        w = members(signed)["weights.safetensors"]
        craft(signed, p, replace={"weights.safetensors": w[:-4] + b"\0\0\0\0"})
    elif tamper == "manifest":
        craft(signed, p, edit=lambda m: m.update(precision="fp16"))
    elif tamper == "kernel":
        craft(signed, p, replace={f"kernels/{'a' * 64}/k.json": json.dumps({"hash": "a" * 64}).encode(),
                                  f"kernels/{'a' * 64}/k.cubin": b"\x7fELF"},
              edit=lambda m: m.update(kernels={"triton": "3.6.0", "count": 1}))
    else:  # the signature removed: now an unsigned engine, which a load with a key refuses
        items = members(signed)
        d = json.loads(items["digest.json"])
        del d["signature"]
        items["digest.json"] = json.dumps(d).encode()
        write(p, items)
    with pytest.raises(EngineSignatureError):
        ember.Engine.load(p, verify_key=KEY)


def test_a_signature_is_over_the_digest_only_with_this_purpose():
    digest = "ab" * 32
    s = sign(KEY, digest)
    assert verify(KEY, digest, s) and not verify(KEY, "cd" * 32, s) and not verify(KEY[:-1] + b"x", digest, s)
    import hashlib
    import hmac

    assert s != hmac.new(KEY, digest.encode(), hashlib.sha256).hexdigest()  # domain-separated
    assert not verify(KEY, digest, "é" * 64)


def test_keys(tmp_path, caplog):
    with pytest.raises(SigningKeyError, match="is empty"):
        load_key(_key_file(tmp_path / "empty", b""))
    with pytest.raises(SigningKeyError, match="holds 5 bytes; a key needs at least 16"):
        load_key(b"short")
    with pytest.raises(SigningKeyError, match="cannot read key file"):
        load_key(tmp_path / "missing")
    with pytest.raises(SigningKeyError, match="Is a directory|not a regular file"):
        load_key(tmp_path)
    with pytest.raises(SigningKeyError, match="bytes or the path of a key file"):
        load_key(12345)  # type: ignore[arg-type]
    assert load_key(_key_file(tmp_path / "k")) == KEY  # trailing newline ignored
    with caplog.at_level(logging.WARNING):
        assert load_key(_key_file(tmp_path / "open", mode=0o644)) == KEY
    assert "can be read by every user" in caplog.text
    assert issubclass(SigningKeyError, EmberError) and issubclass(EngineSignatureError, EngineFileError)


def test_signing_on_save_with_a_bad_key_fails_before_writing(built, tmp_path):
    eng = ember.Engine.load(built[1])
    with pytest.raises(SigningKeyError):
        eng.save(tmp_path / "x.engine", sign_key=b"")
    assert not (tmp_path / "x.engine").exists()


def test_recomputed_digest_still_needs_the_signature_to_match(built, tmp_path):
    """recompute() keeps the old signature over a new digest: refused."""
    p = tmp_path / "r.engine"
    write(p, recompute(members(built[0]), lambda m: m.update(nodes_in=1)))
    with pytest.raises(EngineSignatureError, match="signature does not match"):
        ember.Engine.load(p, verify_key=KEY)


def test_cli_sign_and_verify_end_to_end(tmp_path, capsys):
    key = _key_file(tmp_path / "deploy.key")
    other = _key_file(tmp_path / "other.key", b"a different key of 32 bytes!!!!!")
    eng = str(tmp_path / "digits.engine")
    model = os.path.join(DIGITS, "digits_cnn.onnx")
    samples = os.path.join(DIGITS, "samples.npz")
    assert main(["build", model, "-o", eng, "--sign-key", str(key)]) == 0
    assert "signed with the key" in capsys.readouterr().err
    out = str(tmp_path / "out.npz")
    assert main(["run", eng, "--input", samples, "--save", out, "--verify-key", str(key)]) == 0
    logits = np.load(out)[ember.Engine.load(eng, verify_key=key).outputs[0].name]
    assert (logits.argmax(1) == np.load(samples)["label"]).mean() > 0.9
    capsys.readouterr()
    for args, message in ((["run", eng], "is signed"),
                          (["run", eng, "--verify-key", str(other)], "signature does not match"),
                          (["bench", eng, "--duration", "0", "--iterations", "1", "--warmup", "0"], "is signed"),
                          (["run", model, "--verify-key", str(key)], "checks engine files"),
                          (["build", model, "-o", str(tmp_path / "x.engine"), "--sign-key",
                            str(_key_file(tmp_path / "e", b""))], "is empty")):
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.engine").exists()
    assert main(["bench", eng, "--duration", "0", "--iterations", "1", "--warmup", "0", "--verify-key", str(key)]) == 0
    unsigned = str(tmp_path / "plain.engine")
    assert main(["build", model, "-o", unsigned]) == 0
    capsys.readouterr()
    assert main(["run", unsigned, "--verify-key", str(key)]) == 1
    assert "is not signed" in capsys.readouterr().err


def test_server_loads_only_engines_signed_with_its_key(built, tmp_path):
    import shutil

    from ember.serve.engine import EngineAdapter
    from ember.serve.errors import RepositoryError

    version = tmp_path / "repo" / "m" / "1"
    version.mkdir(parents=True)
    shutil.copy(built[0], version / "model.engine")
    assert [i.name for i in EngineAdapter.load(version, None, None, "m/1", verify_key=KEY).inputs] == ["x"]
    with pytest.raises(RepositoryError, match="is signed"):
        EngineAdapter.load(version, None, None, "m/1")
    shutil.copy(built[1], version / "model.engine")
    with pytest.raises(RepositoryError, match="is not signed"):
        EngineAdapter.load(version, None, None, "m/1", verify_key=KEY)
    # a model.onnx is built by the server itself, and cached signed with its key
    onnx_version, cache = tmp_path / "repo" / "o" / "1", tmp_path / "cache"
    onnx_version.mkdir(parents=True)
    save(add_mul_model(), onnx_version / "model.onnx")
    EngineAdapter.load(onnx_version, None, cache, "o/1", verify_key=KEY)
    (cached,) = cache.glob("*.engine")
    assert read_engine(cached).signed
    ember.Engine.load(cached, verify_key=KEY)


@pytest.mark.parametrize("via_env", [False, True])
def test_serve_refuses_a_bad_verify_key_before_starting(tmp_path, capsys, monkeypatch, via_env):
    (tmp_path / "repo").mkdir()
    empty = _key_file(tmp_path / "empty.key", b"")
    args = ["serve", str(tmp_path / "repo"), "--no-grpc", "--http-port", "0"]
    if via_env:
        monkeypatch.setenv("EMBER_VERIFY_KEY_FILE", str(empty))
    else:
        args += ["--verify-key", str(empty)]
    assert main(args) == 2
    assert "is empty" in capsys.readouterr().err
