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


def test_disk_estimate_counts_changed_blocks_the_export_and_its_archive(tmp_path) -> None:
    """A 7B-shaped bf16 model (Linear shapes of 32 blocks and a separate head): RTN 4-bit g64's
    export is its packed codes with float32 scales plus the bf16 embeddings and head (4.45 GB
    measured in bench/results/stream_scaling.md); streamed, each block's int8 codes wait in
    scratch; SparseGPT's pruned weights are float32 in scratch, bf16 in the artifact."""
    from workers.compression.preflight import estimate_disk
    from workers.compression.recipe import Recipe

    hidden, ffn, vocab, blocks = 4096, 11008, 49152, 32
    shapes = {"lm_head": [vocab, hidden]}
    for i in range(blocks):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{name}"] = [hidden, hidden]
        shapes[f"model.layers.{i}.mlp.gate_proj"] = [ffn, hidden]
        shapes[f"model.layers.{i}.mlp.up_proj"] = [ffn, hidden]
        shapes[f"model.layers.{i}.mlp.down_proj"] = [hidden, ffn]
    in_blocks = sum(o * i for name, (o, i) in shapes.items() if name.startswith("model."))
    parameters = in_blocks + 2 * vocab * hidden

    def estimate(stages, streamed=True):
        return estimate_disk(
            parameters=parameters,
            linear_shapes=shapes,
            stages=Recipe.model_validate({"stages": stages}).stages,
            folder=tmp_path,
            streamed=streamed,
            stored_bytes_per_parameter=2,
        )

    rtn = estimate([{"method": "rtn", "bits": 4, "group_size": 64}])
    assert abs(rtn.breakdown["export"] - 4_448_682_000) < 0.02 * 4_448_682_000
    assert rtn.breakdown["archive"] == rtn.breakdown["export"]
    assert rtn.breakdown["changed_blocks"] == int(in_blocks * (1 + 4 / 64))
    assert rtn.needed_bytes >= sum(rtn.breakdown.values())
    whole = estimate([{"method": "rtn", "bits": 4, "group_size": 64}], streamed=False)
    assert whole.breakdown["changed_blocks"] == 0
    pruned = estimate([{"method": "sparsegpt", "sparsity": 0.5}])
    assert pruned.breakdown["changed_blocks"] == in_blocks * 4
    assert pruned.breakdown["export"] == 2 * 2 * vocab * hidden + in_blocks * 2  # bf16 again


def test_disk_estimate_refuses_over_the_limit(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from workers.compression.preflight import estimate_disk
    from workers.compression.recipe import Recipe

    stages = Recipe.model_validate({"stages": [{"method": "rtn"}]}).stages
    kwargs = dict(parameters=134_515_008, linear_shapes=SMOLLM2_LIKE, stages=stages)
    assert estimate_disk(**kwargs, folder=tmp_path, streamed=True).free_bytes > 0
    monkeypatch.setenv("SLIMFORMER_DISK_LIMIT_BYTES", str(10 * 1024**2))
    refused = estimate_disk(**kwargs, folder=tmp_path, streamed=True)
    assert not refused.fits and refused.free_bytes == 10 * 1024**2
