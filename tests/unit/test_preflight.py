from workers.compression.preflight import estimate_memory

SMOLLM2_LIKE = (
    {f"model.layers.{i}.mlp.down_proj": [576, 1536] for i in range(30)}
    | {f"model.layers.{i}.self_attn.q_proj": [576, 576] for i in range(30)}
    | {f"model.layers.{i}.mlp.up_proj": [1536, 576] for i in range(30)}
    | {"lm_head": [49152, 576]}
)


def test_estimate_grows_with_calibration_and_counts_weights() -> None:
    small = estimate_memory(
        parameters=134_515_008,
        linear_shapes=SMOLLM2_LIKE,
        calibration_samples=32,
        calibration_seq_len=256,
        evaluation_seq_len=512,
        device="cpu",
    )
    large = estimate_memory(
        parameters=134_515_008,
        linear_shapes=SMOLLM2_LIKE,
        calibration_samples=1024,
        calibration_seq_len=2048,
        evaluation_seq_len=512,
        device="cpu",
    )
    assert small.breakdown["weights"] == 134_515_008 * 4
    assert small.breakdown["calibration_block_activations"] == 2 * 32 * 256 * 576 * 4
    assert small.breakdown["layer_statistics"] == 1536 * 1536 * 4 * 2
    assert large.peak_bytes > small.peak_bytes + 2 * 1024 * 2048 * 576 * 4
    assert small.available_bytes is None or small.available_bytes > 0


def test_estimate_refuses_over_the_limit(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SLIMFORMER_MEMORY_LIMIT_BYTES", str(256 * 1024**2))
    estimate = estimate_memory(
        parameters=134_515_008,
        linear_shapes=SMOLLM2_LIKE,
        calibration_samples=32,
        calibration_seq_len=256,
        evaluation_seq_len=512,
        device="cpu",
    )
    assert not estimate.fits and estimate.available_bytes <= 256 * 1024**2
