#!/usr/bin/env python3
"""CER of an OCR result JSON (rapidocr_ref.json layout) against gt/<pdfstem>_p<N>.txt.

Normalisation (both sides): NFKC (Ⅲ->III, ½->1⁄2), U+2044 -> '/', curly quotes -> ASCII,
bullets '•'/'·' -> '·', whitespace runs -> one space, lines stripped, empty lines dropped.
Two metrics, each in two variants ('ws' keeps single spaces, 'nows' deletes all whitespace,
which isolates the ch model's habit of dropping spaces):
  seq  : page text = lines joined by '\n' in engine order vs GT in reading order (order-sensitive;
         fair only where the engine's order equals reading order, e.g. c03-29)
  line : order-free. Greedy one-to-one matching of GT lines to OCR lines by smallest Levenshtein
         distance; CER = (sum of matched distances + chars of unmatched GT lines + chars of
         unmatched OCR lines) / GT chars.  Use this one for the rotated / two-column pages.
usage: cer.py result.json [gt_dir]   (needs rapidfuzz)"""
import json, re, sys, unicodedata
from pathlib import Path
from rapidfuzz.distance import Levenshtein

def norm_line(s):
    s = unicodedata.normalize("NFKC", s)
    for a, b in (("\u2044", "/"), ("\u2018", "'"), ("\u2019", "'"), ("\u201c", '"'), ("\u201d", '"'), ("\u2022", "\u00b7")):
        s = s.replace(a, b)
    return re.sub(r"\s+", " ", s).strip()

def variant(lines, nows):
    return [re.sub(r"\s+", "", l) if nows else l for l in lines]

def seq_cer(hyp, ref):
    h, r = "\n".join(hyp), "\n".join(ref)
    return Levenshtein.distance(h, r) / max(1, len(r))

def line_cer(hyp, ref):
    pairs = sorted((Levenshtein.distance(h, r), i, j) for i, r in enumerate(ref) for j, h in enumerate(hyp))
    used_r, used_h, edits = set(), set(), 0
    for d, i, j in pairs:
        if i in used_r or j in used_h or d >= len(ref[i]) + len(hyp[j]):
            continue
        used_r.add(i); used_h.add(j); edits += d
    edits += sum(len(r) for i, r in enumerate(ref) if i not in used_r)
    edits += sum(len(h) for j, h in enumerate(hyp) if j not in used_h)
    return edits / max(1, sum(len(r) for r in ref))

def main():
    doc = json.load(open(sys.argv[1]))
    gt_dir = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).parent / "gt")
    for p in doc["pages"]:
        g = gt_dir / f"{Path(p['file']).stem}_p{p['page']}.txt"
        if not g.exists():
            continue
        ref = [l for l in map(norm_line, g.read_text(encoding="utf-8").splitlines()) if l]
        hyp = [l for l in (norm_line(x["text"]) for x in p["lines"]) if l]
        out = []
        for nows in (False, True):
            r, h = variant(ref, nows), variant(hyp, nows)
            out.append(f"seq_{'nows' if nows else 'ws'}={100*seq_cer(h, r):.2f}% line_{'nows' if nows else 'ws'}={100*line_cer(h, r):.2f}%")
        print(f"{p['file']} p{p['page']}: lines ocr={len(hyp)} gt={len(ref)}  " + "  ".join(out))

if __name__ == "__main__":
    main()
