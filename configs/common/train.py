# Common training settings read by tools/lazyconfig_train_net.py (convmae_det.engine.lazy_train).
# Every key, with its meaning:
train = dict(
    output_dir="./output",  # checkpoints, metrics.json, tensorboard events, log.txt, config copy
    init_checkpoint="",  # any format our loader reads (ConvMAE/FastConvMAE/MAE/detectron2/...)
    init_strict=False,  # True: an incomplete match of init_checkpoint is an error (or --strict)
    max_iter=90000,  # total iterations
    amp=dict(enabled=False, precision="bf16"),  # mixed precision on CUDA: "bf16" or "fp16"
    ddp=dict(  # DistributedDataParallel options (CPU processes use gloo, device_ids=None)
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    checkpointer=dict(period=5000, max_to_keep=100),  # PeriodicCheckpointer
    eval_period=5000,  # evaluate every N iterations and after the last one (0: only at the end)
    log_period=20,  # console (with ETA) / metrics.json / tensorboard period
    device="cuda",  # falls back to "cpu" with a warning when CUDA is absent
    seed=-1,  # < 0: random (kept in the checkpoint); iteration i reseeds from (seed, rank, i)
    deterministic=False,  # True: torch deterministic kernels (exact resume on CUDA as well)
    nonfinite_loss="stop",  # NaN/Inf loss: "stop" (error naming iteration and terms) or "skip"
    cudnn_benchmark=False,
)
