"""The benchmark behind ``python launch/bench.py``: each section measures one question and
returns a ``results.SectionResult``; ``report`` turns the results into JSON, Markdown and
PNG plots.

    pipeline   single process vs N torchrun ranks, the real mirror pipeline over WebSocket
    synthetic  chains of sleep / busy-loop stages: achieved FPS vs the ideal bound
    transport  our channel vs raw send/recv, gRPC bytes, multiprocessing.Queue, memcpy
    gpu        stage timings on CUDA, NCCL channel figures (skipped without a device)
    multihost  two network namespaces as hosts: channel vs raw gloo, the pipeline on one host vs two
               (skipped without root)
"""
