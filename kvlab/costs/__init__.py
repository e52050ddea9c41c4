"""The chapters' cost calculators: what a model, a step or a machine *should* cost, without tensors.

Pure arithmetic over configurations and published hardware numbers, so a chapter can predict a
number before it measures it, and a test can check the engine against the prediction:

    flops          the one FLOP count (matmuls) of a forward, a step, a generation
    forward_cost   minimum bytes and roofline time floor of a prefill / decode pass; critical_batch
    memory         the KV memory calculator and published model configurations
    roofline       the roofline model (compute vs bandwidth bound) and hardware numbers
    machine        what machine this is (CPU, threads, GPU, versions) for result files
    fit            least squares a + b n + c n^2 for measured step times

Nothing here imports the engine, and the engine never imports this package.
"""
