"""A tiny OpenVINO extension library (op `CustomAddOne`, domain `edge_test`: y = x + 1), built
with g++ against the pip openvino package's headers and cached by what goes into it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = r"""
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>

namespace edge_test {

// y = x + 1, element-wise, f32: enough to see a custom op's effect in the numbers.
class CustomAddOne : public ov::op::Op {
public:
    OPENVINO_OP("CustomAddOne", "edge_test");

    CustomAddOne() = default;
    explicit CustomAddOne(const ov::Output<ov::Node>& x) : Op({x}) {
        constructor_validate_and_infer_types();
    }
    void validate_and_infer_types() override {
        set_output_type(0, get_input_element_type(0), get_input_partial_shape(0));
    }
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<CustomAddOne>(args.at(0));
    }
    bool visit_attributes(ov::AttributeVisitor&) override { return true; }
    bool has_evaluate() const override { return get_input_element_type(0) == ov::element::f32; }
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        outputs[0].set_shape(inputs[0].get_shape());
        const float* src = inputs[0].data<const float>();
        float* dst = outputs[0].data<float>();
        for (size_t i = 0; i < inputs[0].get_size(); ++i) dst[i] = src[i] + 1.0f;
        return true;
    }
};

}  // namespace edge_test

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<edge_test::CustomAddOne>>()
}));
"""

CACHE = Path.home() / ".cache" / "edge-daemon" / "test-ext"


def build_extension() -> Path:
    """The built library (compiled once per source, OpenVINO build and compiler flags)."""
    import openvino as ov

    pkg = Path(ov.__file__).parent
    (libopenvino,) = sorted((pkg / "libs").glob("libopenvino.so.*"))  # no unversioned symlink
    compiler = shutil.which("g++") or "g++"
    flags = ["-std=c++17", "-shared", "-fPIC", "-O1", "-pipe", f"-I{pkg / 'include'}"]
    key = hashlib.sha256("\0".join([SOURCE, ov.__version__, compiler, *flags]).encode())
    out = CACHE / key.hexdigest()[:16] / "libedge_test_ops.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / "edge_test_ops.cpp"
    src.write_text(SOURCE)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    proc = subprocess.run([compiler, *flags, str(src), "-o", str(tmp), str(libopenvino),
                           f"-Wl,-rpath,{pkg / 'libs'}"], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"building the test extension failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: a concurrent run sees a whole library or none
    return out
