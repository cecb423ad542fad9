"""The package's lazily exported names resolve to what they name, and ``libra_model.generate`` is always the
command-line module (a re-exported ``generate`` function would be replaced by the module once it is imported)."""

import importlib
import subprocess
import sys

import libra_model


def test_every_export_resolves_to_its_module_attribute():
    for name, module in libra_model._EXPORTS.items():
        assert getattr(libra_model, name) is getattr(importlib.import_module(module), name), name
    assert sorted(libra_model.__all__) == sorted(libra_model._EXPORTS)


def test_generate_names_one_thing_in_either_import_order():
    script = ("import importlib, libra_model, libra_model.decoding as d; {first}; from libra_model import generate; "
              "assert generate is importlib.import_module('libra_model.generate'), generate; "
              "assert libra_model.LibraForCausalLM.generate is not None and callable(d.generate)")
    for first in ("import libra_model.generate", "pass"):
        subprocess.run([sys.executable, "-c", script.format(first=first)], check=True, timeout=300)
