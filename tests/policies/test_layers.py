from transformers import AutoModelForSequenceClassification

from ftlab.policies.layers import find_parts

EXPECTED_BLOCKS = {"bert": "bert.encoder.layer", "llama": "model.layers", "gpt2": "transformer.h"}


def test_blocks_embeddings_and_head_found_without_per_model_code(tiny_models):
    for kind, prefix in EXPECTED_BLOCKS.items():
        model = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=2)
        parts = find_parts(model)
        assert parts.blocks == (f"{prefix}.0", f"{prefix}.1"), kind
        heads = {n for n, _ in model.named_parameters() if parts.is_head(n)}
        assert heads and all(n.startswith(("classifier", "score")) for n in heads), (kind, heads)
        # embeddings sit below the blocks, the final norm / pooler above them
        depths = {n: parts.depth(n) for n, _ in model.named_parameters()}
        embeddings = [n for n in depths if "embed" in n or n.startswith("transformer.w")]
        assert embeddings and all(depths[n] == 0 for n in embeddings), kind
        assert all(depths[n] == 3 for n in heads)
