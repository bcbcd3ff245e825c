"""Kernels: Triton (``triton/``) and the HLS C++ templates (``hls/``);
installed as ``rewriter.kernels``.

Imports nothing of ours."""

if __name__ == "kernels":  # the bare name from the repository root: see rewriter/_toplevel.py
    import runpy

    runpy.run_path(
        f"{__path__[0]}/../rewriter/_toplevel.py", {"NAME": __name__, "FOLDER": __path__[0]}
    )
