"""Makes a model variant from its manifest's [variants.<v>.quantize] recipe
with ONNX Runtime's static quantization (onnxruntime.quantization, QDQ):
renders the calibration pages with pypdfium2, prepares them as the manifest's
[input] says, calibrates, and writes <weights_dir>/<variant file>.
scripts/quantize then runs the accuracy gate (`pagestream gate`) on it, and
keeps it only if it passes.

    quantize.py MODELS_DIR WEIGHTS_DIR CORPUS_DIRS MODEL@VARIANT

CORPUS_DIRS: directories searched for the calibration PDFs, `:`-separated.
Prints the path of the candidate file on its last line.
"""

import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pypdfium2 as pdfium
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


def find_pdf(name, dirs):
    for d in dirs:
        p = Path(d) / name
        if p.is_file():
            return p
    sys.exit(f"quantize: calibration PDF {name} not found in {', '.join(map(str, dirs))} (scripts/fetch-corpus {name})")


def pages(pdf, first, last, step, dpi):
    doc = pdfium.PdfDocument(str(pdf))
    for i in range(first - 1, min(last, len(doc)), step):
        yield doc[i].render(scale=dpi / 72).to_pil().convert("RGB")
    doc.close()


def prepare(img, inp):
    """The page as the model's input tensor, as the inferencer prepares it
    (preprocess.rs): stretch or centred letterbox, channel order, scale,
    mean/std. Pillow's bilinear resize stands in for ours: close enough to
    set activation ranges."""
    w, h = inp["width"], inp["height"]
    if inp["resize"] == "stretch":
        arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)
    else:
        s = min(w / img.width, h / img.height)
        nw, nh = max(1, round(img.width * s)), max(1, round(img.height * s))
        canvas = np.full((h, w, 3), inp.get("pad_value", 114), dtype=np.float32)
        x0, y0 = (w - nw) // 2, (h - nh) // 2
        canvas[y0 : y0 + nh, x0 : x0 + nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR), dtype=np.float32)
        arr = canvas
    if inp["channel_order"] == "bgr":
        arr = arr[:, :, ::-1]
    arr = arr * inp["scale"]
    arr = (arr - np.array(inp["mean"], dtype=np.float32)) / np.array(inp["std"], dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None], dtype=np.float32)


class Pages(CalibrationDataReader):
    def __init__(self, name, tensors):
        self.it = iter([{name: t} for t in tensors])

    def get_next(self):
        return next(self.it, None)


def main():
    models_dir, weights_dir, corpus_dirs, spec = sys.argv[1:5]
    model, variant = spec.split("@", 1)
    manifest = tomllib.loads((Path(models_dir) / model / "model.toml").read_text())
    v = manifest.get("variants", {}).get(variant)
    if v is None or "quantize" not in v:
        sys.exit(f"quantize: {model} has no [variants.{variant}.quantize] recipe in its manifest")
    q = v["quantize"]
    inp = manifest["input"]
    src = Path(weights_dir) / manifest["weights"]["file"]
    out = Path(weights_dir) / v["file"]
    work = Path(weights_dir) / f".quantize-{model}-{variant}"
    work.mkdir(exist_ok=True)

    tensors = []
    for name, first, last, step in q["calibration"]:
        pdf = find_pdf(name, corpus_dirs.split(":"))
        tensors += [prepare(img, inp) for img in pages(pdf, first, last, step, q.get("dpi", 150))]
    print(f"quantize: {spec}: {len(tensors)} calibration pages", file=sys.stderr)

    # ONNX Runtime's quantizer wants opset ≥ 13 (≥ 17 for some fusions) and
    # a pre-processed graph (shapes inferred, fused).
    m = onnx.load(str(src))
    opset = q.get("opset")
    if opset and m.opset_import[0].version < opset:
        m = version_converter.convert_version(m, opset)
    converted = work / "converted.onnx"
    onnx.save(m, str(converted))
    pre = work / "pre.onnx"
    quant_pre_process(str(converted), str(pre))

    nodes = [n.name for n in onnx.load(str(pre)).graph.node]
    exclude = [n for n in nodes if any(pat in n for pat in q.get("exclude", []))]
    kw = {}
    if q.get("op_types"):
        kw["op_types_to_quantize"] = q["op_types"]
    quantize_static(
        str(pre),
        str(out),
        Pages(inp["name"], tensors),
        quant_format=QuantFormat.QDQ,
        per_channel=q.get("per_channel", True),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=METHODS[q.get("method", "minmax")],
        nodes_to_exclude=exclude,
        extra_options=dict(q.get("extra", {})),
        **kw,
    )
    # The labels the manifest reads from the model's metadata survive.
    qm = onnx.load(str(out))
    have = {p.key for p in qm.metadata_props}
    for p in m.metadata_props:
        if p.key not in have:
            qm.metadata_props.add(key=p.key, value=p.value)
    onnx.save(qm, str(out))
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    print(f"quantize: {spec}: {len(exclude)} of {len(nodes)} nodes left in fp32", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
