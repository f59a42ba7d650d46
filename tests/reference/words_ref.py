#!/usr/bin/env python3
"""Reference words (text + box in PDF points) from pypdfium2's own text extraction.

Usage: words_ref.py FILE.pdf [--pages 1-10] [--password PW] [--indent N] > ref.json

Definition "pagestream-words-v1" (what a Rust test must reproduce):
  * Page text = pdfium's FPDFText_GetText over the whole page
    (pypdfium2 PdfTextPage.get_text_range()), i.e. in content-stream order,
    with pdfium's generated spaces and CRLFs. Each UTF-16 unit k of it is
    mapped to its char index with FPDFText_GetCharIndexFromTextIndex.
  * Words are maximal runs of code points that are not Unicode White_Space
    (exactly Rust's char::is_whitespace). U+FFFE (text) / U+0002 (char list):
    pdfium's end-of-line hyphen: it is written as "-", ends the word, and
    starts a new line (pdfium emits no CRLF after it).
  * Word text is NFC as pdfium gives it (no ligature expansion here; the
    comparison applies NFKC to both sides).
  * bbox   = union of FPDFText_GetLooseCharBox of the word's chars,
    tight  = union of FPDFText_GetCharBox, both [left, bottom, right, top] in
    PDF user space (points, origin bottom-left of the MediaBox coordinate
    system, /Rotate NOT applied). Generated chars and chars whose box has
    zero width and zero height are left out of the union; a word with no box
    left is dropped (counted in dropped_no_box).
  * A word whose bbox centre lies outside the page bbox (CropBox ∩ MediaBox,
    FPDF_GetPageBoundingBox) is dropped (counted in dropped_outside).
  * line = number of line breaks before the word on the page: "\n", a "\r"
    not followed by "\n", and the hyphen marker.
"""
import argparse
import ctypes
import json
import sys
import unicodedata

import pypdfium2 as pdfium
import pypdfium2.raw as c

# Unicode White_Space = Rust char::is_whitespace (Python's str.isspace also
# accepts U+001C..U+001F, which Rust does not: do not use it).
WHITE_SPACE = set(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
HYPHEN_MARKERS = {0xFFFE, 0x0002}
DEFINITION = "pagestream-words-v1"


def r3(v):
    return round(v, 3)


def union(a, b):
    if a is None:
        return list(b)
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


def char_boxes(tp, ci):
    """(loose, tight) boxes of char ci as [l, b, r, t], or None when degenerate/generated."""
    if c.FPDFText_IsGenerated(tp, ci) == 1:
        return None
    l, b, r, t = (ctypes.c_double() for _ in range(4))
    if not c.FPDFText_GetCharBox(tp, ci, l, r, b, t):  # argument order l, r, b, t
        return None
    tight = [l.value, b.value, r.value, t.value]
    rect = c.FS_RECTF()
    if not c.FPDFText_GetLooseCharBox(tp, ci, rect):
        return None
    loose = [rect.left, rect.bottom, rect.right, rect.top]
    if loose[2] - loose[0] <= 0 and loose[3] - loose[1] <= 0:
        return None
    if tight[2] - tight[0] <= 0 and tight[3] - tight[1] <= 0:
        tight = loose  # e.g. a glyph without outline: fall back to the loose box
    return loose, tight


def page_words(page):
    tp = page.get_textpage()
    n_chars = tp.count_chars()
    L, B, R, T = page.get_bbox()
    info = {
        "width": r3(page.get_width()),
        "height": r3(page.get_height()),
        "rotation": page.get_rotation(),
        "bbox": [r3(L), r3(B), r3(R), r3(T)],
        "n_chars": n_chars,
        "has_text": n_chars > 0,
        "words": [],
        "dropped_no_box": 0,
        "dropped_outside": 0,
        "unmapped_units": 0,
    }
    if n_chars == 0:
        tp.close()
        return info
    text = tp.get_text_range()
    # Global text index of the first unit of `text` (get_text_range skips
    # leading chars that have no text index).
    t0 = next((ti for ti in (c.FPDFText_GetTextIndexFromCharIndex(tp, i) for i in range(n_chars)) if ti >= 0), 0)
    raw = text.encode("utf-16-le")
    units = [int.from_bytes(raw[k : k + 2], "little") for k in range(0, len(raw), 2)]

    words = info["words"]
    cur_text, cur_loose, cur_tight, cur_chars = [], None, None, []
    line = 0
    cur_line = 0

    def flush():
        nonlocal cur_text, cur_loose, cur_tight, cur_chars
        if cur_text:
            if cur_loose is None:
                info["dropped_no_box"] += 1
            else:
                cx, cy = (cur_loose[0] + cur_loose[2]) / 2, (cur_loose[1] + cur_loose[3]) / 2
                if not (L <= cx <= R and B <= cy <= T):
                    info["dropped_outside"] += 1
                else:
                    words.append(
                        {
                            "text": "".join(cur_text),
                            "bbox": [r3(v) for v in cur_loose],
                            "tight": [r3(v) for v in cur_tight],
                            "line": cur_line,
                            "chars": [min(cur_chars), max(cur_chars)] if cur_chars else None,
                        }
                    )
        cur_text, cur_loose, cur_tight, cur_chars = [], None, None, []

    k = 0
    while k < len(units):
        u = units[k]
        ks = [k]
        if 0xD800 <= u <= 0xDBFF and k + 1 < len(units) and 0xDC00 <= units[k + 1] <= 0xDFFF:
            cp = 0x10000 + ((u - 0xD800) << 10) + (units[k + 1] - 0xDC00)
            ks.append(k + 1)
        else:
            cp = u
        k += len(ks)
        cis = [c.FPDFText_GetCharIndexFromTextIndex(tp, t0 + kk) for kk in ks]
        info["unmapped_units"] += sum(1 for ci in cis if ci < 0)
        if cp in WHITE_SPACE:
            flush()
            if cp == 0x0A or (cp == 0x0D and not (k < len(units) and units[k] == 0x0A)):
                line += 1
            continue
        is_hyphen = cp in HYPHEN_MARKERS
        if not cur_text:
            cur_line = line
        cur_text.append("-" if is_hyphen else chr(cp))
        for ci in cis:
            if ci < 0:
                continue
            cur_chars.append(ci)
            boxes = char_boxes(tp, ci)
            if boxes:
                cur_loose = union(cur_loose, boxes[0])
                cur_tight = union(cur_tight, boxes[1])
        if is_hyphen:
            flush()
            line += 1
    flush()
    tp.close()
    return info


def parse_pages(spec, n):
    if not spec:
        return list(range(1, n + 1))
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), min(int(b or a), n) + 1))
    return [p for p in out if 1 <= p <= n]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pdf")
    ap.add_argument("--pages", help="1-based, e.g. 1-10,12")
    ap.add_argument("--password")
    ap.add_argument("--indent", type=int, default=None)
    a = ap.parse_args()
    pdf = pdfium.PdfDocument(a.pdf, password=a.password)
    pages = []
    for no in parse_pages(a.pages, len(pdf)):
        page = pdf[no - 1]
        info = page_words(page)
        info = {"page": no, **info}
        pages.append(info)
        page.close()
    out = {
        "definition": DEFINITION,
        "source": a.pdf.split("/")[-1],
        "pypdfium2": pdfium.PYPDFIUM_INFO.version if hasattr(pdfium.PYPDFIUM_INFO, "version") else str(pdfium.PYPDFIUM_INFO),
        "pdfium": str(pdfium.PDFIUM_INFO),
        "page_count": len(pdf),
        "pages": pages,
    }
    json.dump(out, sys.stdout, indent=a.indent, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
