"""transformers' from_pretrained finds the tensorslim quantizer whichever of the two packages
is imported first (tensorslim registers at once, or when transformers loads its registry)."""
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

CHECK = ("from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
         "assert 'tensorslim' in AUTO_QUANTIZER_MAPPING and 'tensorslim' in AUTO_QUANTIZATION_CONFIG_MAPPING\n")


@pytest.mark.parametrize("first", ["tensorslim", "transformers"])
def test_registered_in_either_import_order(first):
    imports = ("import tensorslim\nimport transformers\n" if first == "tensorslim"
               else "import transformers.quantizers.auto\nimport tensorslim\n")
    done = subprocess.run([sys.executable, "-c", imports + CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
