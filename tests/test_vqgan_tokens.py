"""VQ image tokenizer (encoder parity with transformers, quantizer, decoder) and the token formats."""
from __future__ import annotations

import pytest
import torch

from mmr1.tokens import ImageVocab, TextTokenizer, bpe_name_to_code, code_to_bpe_name
from mmr1.vqgan import VQConfig, VQModel, load_vqgan

TINY = dict(embed_dim=8, num_embeddings=16, latent_channels=8, base_channels=32, channel_multiplier=[1, 2],
            num_res_blocks=1, resolution=32)


def test_encoder_parity_with_transformers_and_hf_checkpoint(tmp_path):
    from safetensors.torch import save_file
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    torch.manual_seed(0)
    hf = ChameleonVQVAE(ChameleonVQVAEConfig(**TINY)).eval()
    # HF checkpoints store the VQ encoder under model.vqmodel.* (no decoder)
    save_file({f"model.vqmodel.{k}": v.contiguous() for k, v in hf.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    ours = load_vqgan(tmp_path, VQConfig.from_dict(TINY))
    assert ours.decoder is None
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = hf.encode(pixels)
        torch.testing.assert_close(ours.encoder(pixels), hf.encoder(pixels), atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.encode(pixels).reshape(-1), expected.image_tokens.reshape(-1))
    with pytest.raises(RuntimeError, match="without a decoder"):
        ours.decode(torch.zeros(1, 16, 16, dtype=torch.long))


def test_original_checkpoint_layout_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = VQModel(VQConfig(**TINY))
    state = {**model.state_dict(), "loss.discriminator.weight": torch.zeros(1)}  # taming ckpts carry the GAN loss
    torch.save({"state_dict": state}, tmp_path / "vqgan.ckpt")
    loaded = load_vqgan(tmp_path / "vqgan.ckpt", VQConfig(**TINY))
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    codes = loaded.encode(pixels)
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
    img = loaded.decode(codes)
    assert img.shape == (1, 3, 32, 32) and img.abs().max() <= 1
    with pytest.raises(ValueError, match="does not match"):
        load_vqgan(tmp_path / "vqgan.ckpt", VQConfig(**{**TINY, "base_channels": 64}))


def test_quantizer_picks_the_nearest_code():
    model = VQModel(VQConfig(**TINY), with_decoder=False)
    z = torch.randn(2, 8, 3, 5)
    codes = model.quantize.codes(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(flat, model.quantize.embedding.weight).argmin(1)
    assert torch.equal(codes.reshape(-1), brute)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 31, 32))


def test_bpe_names_roundtrip():
    for code in (0, 7, 10, 8191):
        assert bpe_name_to_code(code_to_bpe_name(code)) == code
    assert code_to_bpe_name(123) == "IMGIMGBCDZ"
    with pytest.raises(ValueError):
        bpe_name_to_code("IMGIMGXZ")


def _tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in range(16):  # codes in shuffled order: the mapping must come from the names
        vocab[code_to_bpe_name(15 - c)] = 4 + c
    for name in ["<eoss>", "<racm3:break>", "<reserved08799>", "<reserved08800>", "<think>", "</think>", "a", "dog",
                 "red"]:
        vocab[name] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, vocab


def test_image_vocab_from_tokenizer_json_and_blocks(tmp_path):
    path, vocab = _tokenizer_json(tmp_path)
    iv = ImageVocab.from_tokenizer_json(path)
    assert iv.num_codes == 16 and iv.window == (4, 20)
    assert int(iv.code_to_token[15]) == 4 and iv.boi == vocab["<racm3:break>"]
    codes = torch.randint(0, 16, (4, 6))
    block = iv.encode_block(codes)
    assert block.numel() == iv.block_length(4, 6) == 3 + 4 * 7 + 1
    assert int(block[1]) == iv.size_base + 2 and int(block[2]) == iv.size_base + 3
    assert torch.equal(iv.decode_block(block), codes)
    assert iv.find_blocks([7, *block.tolist(), 9]) == [(1, 1 + block.numel())]
    bad = block.clone()
    bad[3 + 6] = iv.code_to_token[0]  # a code where the newline belongs
    with pytest.raises(ValueError, match="newline"):
        iv.decode_block(bad)
    with pytest.raises(ValueError, match="tokens"):
        iv.decode_block(block[:-2].tolist() + [iv.eoi])
    tt = TextTokenizer(path)
    assert tt.decode(tt.encode("a red dog")) == "a red dog"
    with pytest.raises(KeyError):
        tt.token_id("<nope>")


def test_lumina_vocab_layout():
    iv = ImageVocab.lumina()
    assert iv.window == (4, 8196)
    layout = iv.forced_layout(32, 32)
    assert layout.numel() == 1060  # 512x512 image: 32 rows of 32 codes + newline, boi H W eoi
    assert layout[:3].tolist() == [8197, 8820, 8820] and layout[-1] == 8196 and layout[3 + 32] == 8803
    with pytest.raises(ValueError, match="size_unit"):
        iv.forced_layout(3, 4)
