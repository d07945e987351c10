"""Run compiled artefacts from Python.

``attnc.runtime.load("out/")`` runs whatever ``attnc compile -o out/`` built, on the backend its
manifest names: the ONNX file on ONNX Runtime (the embedded default: CPU, or CUDA with
onnxruntime-gpu), or ``engine.plan`` on TensorRT::

    from attnc import runtime

    model = runtime.load("out/")                 # ONNX Runtime: providers=, threads=
    outputs = model.infer({"image": images})      # numpy in, {output name: numpy} out
    print([s.name for s in model.input_specs], model.output_names)

``Engine`` is the TensorRT backend's runner (:class:`attnc.compiler.backends.tensorrt.EngineRunner`):
it needs TensorRT and an NVIDIA GPU, takes numpy arrays or torch tensors and returns numpy
(or CUDA torch tensors with ``as_torch=True``). The fused ops of a TensorRT-RTX engine (Python
plugins) run with their Triton kernels; ``Engine(path, plugin_impl="reference")`` runs them with
their torch reference instead (slow; to check the kernels). The choice is per engine: engines
loaded with different ones run side by side in one process.

``generate`` decodes with a compiled generation step that carries its KV cache (``attnc export
CKPT --with-past``): greedily, or with beam search, sampling and logits processors, named and meant as
transformers' ``generate`` options (``generation_options`` reads a checkpoint's)::

    step = runtime.load("out/")
    tokens = runtime.generate(step, prompt_ids, prompt_mask, max_new_tokens=32, eos_token_id=2)
    tokens = runtime.generate(step, prompt_ids, prompt_mask, max_new_tokens=32, num_beams=4)

and ``generate_seq2seq`` with an encoder-decoder model's first step (``--first-step``) and later steps
(``--with-past``); exported with ``--with-attention-mask`` too, they decode sources padded on the right::

    tokens = runtime.generate_seq2seq(runtime.load("first/"), runtime.load("step/"), input_ids,
                                      decoder_start_token_id=0, attention_mask=source_mask, max_new_tokens=32)

and ``generate_vision_language`` with a vision-language checkpoint's first step (``--first-step``: the image and
the prompt) and later steps (``--with-past``: its language model)::

    tokens = runtime.generate_vision_language(runtime.load("first/"), runtime.load("step/"), pixel_values,
                                              input_ids, max_new_tokens=32)
"""

from attnc.compiler.backends.tensorrt import EngineRunner as Engine
from attnc.compiler.decode import generate, generate_seq2seq, generate_vision_language
from attnc.compiler.pipeline import load_artefact as load
from attnc.compiler.search import GenerationOptions, generation_options

__all__ = ["Engine", "GenerationOptions", "generate", "generate_seq2seq", "generate_vision_language",
           "generation_options", "load"]
