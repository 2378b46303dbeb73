"""silero-vad (a streaming voice-activity detector whose every Conv sits inside If branches) and real speech for it.

    python models/silero_vad.py            # needs pip (PyPI) and Debian's asterisk-core-sounds-en-wav; no torch

Model: `silero_vad/data/silero_vad.onnx` from the PyPI wheel silero-vad 6.2.3 (`pip download --no-deps`; nothing of
the package is imported). Its graph is one If on `sr == 16000`: the then branch is the 16 kHz network, the else
branch the 8 kHz one, each with 6 Convs (an STFT basis, 4 encoder convs, the decoder head) and an LSTM.

Audio: the 568 prompts of Debian's `asterisk-core-sounds-en-wav` (one speaker recorded at 8 kHz, 16-bit PCM,
`/usr/share/asterisk/sounds/en_US_f_Allison`): real speech with the pauses of real prompts. Sorted by name, every
4th prompt goes to calibration, the others are held out. Each set is played as one stream (prompts joined by
0.3 s of silence) through the FLOAT model as silero's own OnnxWrapper does (chunks of 256 samples at 8 kHz /
512 at 16 kHz, each with the previous 32 / 64 samples as context, the LSTM state carried from chunk to chunk);
every chunk's (input, state) is a sample. 16 kHz streams are the same prompts resampled x2 (FFT), so the 16 kHz
branch sees speech without content above 4 kHz: real speech, band-limited.

Written to ~/.cache/onnxspfq/models/silero_vad/: silero_vad.onnx and, per rate R in (8k, 16k),
silero_R_calib.npz (512 chunks, 16 s) and silero_R_eval.npz (2048 chunks, 66 s), each {input [N, 288 | 576],
state [2, N, 128], sr []} (state's batch axis is 1: pass --batch-axis state=1).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import wave
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path.home() / ".cache" / "onnxspfq" / "models" / "silero_vad"
WHEEL = "silero-vad==6.2.3"
SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
RATES = {"8k": (8000, 256, 32), "16k": (16000, 512, 64)}  # sr, chunk, context (silero's OnnxWrapper)
CALIB_CHUNKS, EVAL_CHUNKS = 512, 2048


def fetch_model(out: Path) -> Path:
    """silero_vad.onnx from the PyPI wheel (downloaded with pip, read as a zip)."""
    dest = out / "silero_vad.onnx"
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("silero_vad-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read("silero_vad/data/silero_vad.onnx")
    out.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(data)
    os.replace(tmp_dest, dest)
    return dest


def prompts() -> tuple[list[Path], list[Path]]:
    """(calibration, held-out) prompt files: every 4th in sorted name order, and the rest."""
    files = sorted(SOUNDS.rglob("*.wav"))
    if not files:
        sys.exit(f"no prompts in {SOUNDS}: apt-get install asterisk-core-sounds-en-wav")
    return files[::4], [f for i, f in enumerate(files) if i % 4]


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getframerate() != 8000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 8 kHz 16-bit mono")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def stream(files: list[Path], rate: int, seconds: float) -> np.ndarray:
    """The prompts joined by 0.3 s of silence, at `rate` (x2 by FFT zero-padding for 16 kHz), cut to `seconds`."""
    parts, total = [], 0
    gap = np.zeros(int(0.3 * 8000), np.float32)
    for f in files:
        x = np.concatenate([read_wav(f), gap])
        if rate == 16000:
            spec = np.fft.rfft(x)
            x = (np.fft.irfft(np.concatenate([spec, np.zeros(len(x) - len(spec) + 1)]), 2 * len(x)) * 2).astype(
                np.float32)
        parts.append(x)
        total += len(x)
        if total >= seconds * rate:
            break
    return np.concatenate(parts)[: int(seconds * rate)]


def _run_stream(model: str, audio: np.ndarray, tag: str, n: int):
    """Per chunk of `audio` at rate `tag`, as silero's OnnxWrapper feeds it: (input, state fed, speech probability),
    the model carrying its OWN state from chunk to chunk (how silero is deployed: a compressed model's errors feed
    back through the LSTM)."""
    import onnxruntime as ort

    rate, chunk, context = RATES[tag]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros(context, np.float32)
    for i in range(n):
        x = np.concatenate([ctx, audio[i * chunk:(i + 1) * chunk]])[None, :]
        p, new_state = sess.run(None, {"input": x, "state": state, "sr": np.array(rate, np.int64)})
        yield x[0], state[:, 0], float(p.reshape(-1)[0])
        state, ctx = new_state, x[0, -context:]


def chunk_feeds(model: str, audio: np.ndarray, tag: str, n: int) -> dict[str, np.ndarray]:
    """n chunks of `audio` as calibration samples, the state carried by the float model."""
    inputs, states, _ = zip(*_run_stream(model, audio, tag, n))
    return {"input": np.stack(inputs), "state": np.stack(states, axis=1), "sr": np.array(RATES[tag][0], np.int64)}


def stream_probs(model: str, audio: np.ndarray, tag: str, n: int) -> np.ndarray:
    """Speech probability of each of n chunks of `audio`, the model carrying its own state."""
    return np.array([p for _, _, p in _run_stream(model, audio, tag, n)])


def held_out_stream(tag: str, n: int = EVAL_CHUNKS) -> np.ndarray:
    """The held-out prompts as one stream at rate `tag`, long enough for n chunks."""
    rate, chunk, _ = RATES[tag]
    return stream(prompts()[1], rate, n * chunk / rate + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    model = str(fetch_model(args.out))
    calib, held = prompts()
    for tag, (rate, chunk, _) in RATES.items():
        for name, files, n in (("calib", calib, CALIB_CHUNKS), ("eval", held, EVAL_CHUNKS)):
            audio = stream(files, rate, n * chunk / rate + 1)
            feeds = chunk_feeds(model, audio, tag, n)
            path = args.out / f"silero_{tag}_{name}.npz"
            np.savez(path, **feeds)
            print(f"{path}: {n} chunks, input {feeds['input'].shape}")


if __name__ == "__main__":
    main()
