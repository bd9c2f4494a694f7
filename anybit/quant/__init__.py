"""Any-bit weight quantization: packed format, RTN and GPTQ quantizers, checkpoints, CLI.

``format.py`` (layout, pack/unpack, codebooks), ``rtn.py`` (QuantSpec, round-to-nearest),
``gptq.py`` (GPTQ), ``calib_forward.py`` (dense per-layer forward for calibration),
``checkpoint.py`` (safetensors reading/writing), ``config.py`` (QuantConfig from config.json),
``cli.py`` (``anybit quantize``). No serving logic here.
"""
