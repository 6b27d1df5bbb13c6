"""Tests for regflow.serving.codec: the serving wire format."""

import base64
import gzip
import io
import tracemalloc

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from regflow.errors import RegflowError, RequestTooLarge
from regflow.serving.codec import (
    RequestError,
    decode_volume,
    encode_result,
    encode_volume,
    join_results,
    parse_request,
    read_request,
)
from regflow.serving.limits import Limits

AFFINE = np.array([[1.5, 0, 0, -10], [0, 2.0, 0, 20], [0, 0, 0.5, 3], [0, 0, 0, 1]])


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(9, 10, 8)).astype(np.float32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def npy_text(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return b64(buffer.getvalue())


def test_nifti_round_trip_keeps_values_and_affine(volume):
    array, affine, encoding = decode_volume(encode_volume(volume, AFFINE), "v")
    assert encoding == "nii.gz"
    assert array.dtype == np.float32 and array.shape == (9, 10, 8)
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(affine, AFFINE)


def test_npy_round_trip(volume):
    text = encode_volume(torch.from_numpy(volume).double(), None, encoding="npy")
    assert base64.b64decode(text)[:6] == b"\x93NUMPY"
    array, affine, encoding = decode_volume(text, "v")
    assert (encoding, affine) == ("npy", None)
    np.testing.assert_array_equal(array, volume)


def test_uncompressed_nifti_is_read(volume):
    raw = nib.Nifti1Image(volume, AFFINE).to_bytes()
    array, affine, encoding = decode_volume(b64(raw), "v")
    assert encoding == "nii.gz"
    np.testing.assert_array_equal(array, volume)


def test_channels_round_trip_both_encodings(volume):
    ddf = np.stack([volume, -volume, 2 * volume])  # (3, D, H, W)
    for encoding in ("nii.gz", "npy"):
        array, _, _ = decode_volume(encode_volume(ddf, AFFINE, encoding), "ddf", channels=True)
        np.testing.assert_array_equal(array, ddf)


def test_nifti_channels_are_stored_last(volume):
    text = encode_volume(np.stack([volume, volume + 1]), AFFINE)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))
    assert image.shape == (9, 10, 8, 2)
    np.testing.assert_array_equal(image.get_fdata()[..., 1], volume + 1)


@pytest.mark.parametrize("shape", [(1, 9, 10, 8), (9, 10, 8, 1)])
def test_singleton_channel_is_squeezed(shape):
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    for text in (b64(nib.Nifti1Image(array, AFFINE).to_bytes()), npy_text(array)):
        decoded, _, _ = decode_volume(text, "v")
        np.testing.assert_array_equal(decoded, array.reshape(9, 10, 8))


def test_64_cube_encodes_under_2_mb():
    noise = np.random.default_rng(1).random((64, 64, 64), dtype=np.float32)
    assert len(encode_volume(noise, AFFINE)) < 1.5e6  # incompressible: 1 MiB raw + base64
    grid = np.indices((64, 64, 64)).sum(0).astype(np.float32)
    assert len(encode_volume(grid, AFFINE)) < 0.5e6


def test_unknown_encoding_is_an_error(volume):
    with pytest.raises(RegflowError, match="encoding 'png'"):
        encode_volume(volume, None, encoding="png")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64 !!", "inputs.moving\\[0\\]: not valid base64"),
        ("", "inputs.moving\\[0\\]: empty string"),
        (3.5, "inputs.moving\\[0\\]: expected a base64 string, got float"),
        (b64(b"hello world, not an image"), "inputs.moving\\[0\\]: not a .nii.gz"),
        (b64(gzip.compress(b"x" * 400)), "inputs.moving\\[0\\]: gzip data is not a NIfTI"),
        (b64(b"\x1f\x8b" + b"junk"), "inputs.moving\\[0\\]: corrupt gzip"),
    ],
)
def test_malformed_volume_names_the_field(text, message):
    with pytest.raises(RequestError, match=message):
        decode_volume(text, "inputs.moving[0]")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4), np.float32), "inputs.fixed\\[1\\]: expected a 3-D volume .* \\(4, 4\\)"),
        (np.zeros((2, 4, 4, 4), np.float32), "got shape \\(2, 4, 4, 4\\)"),
        (np.zeros((4, 4, 4), object), "inputs.fixed\\[1\\]: unreadable .npy"),
        (np.full((4, 4, 4), np.nan, np.float32), "inputs.fixed\\[1\\]: contains NaN"),
        (np.zeros((4, 4, 4), "U3"), "inputs.fixed\\[1\\]: dtype <U3 is not a supported number"),
        (np.zeros((4, 4, 4), np.complex64), "inputs.fixed\\[1\\]: dtype complex64 is not"),
    ],
)
def test_bad_npy_volume_names_the_field(array, message):
    with pytest.raises(RequestError, match=message):
        decode_volume(npy_text(array), "inputs.fixed[1]")


def test_truncated_nifti_names_the_field(volume):
    raw = gzip.compress(nib.Nifti1Image(volume, AFFINE).to_bytes()[:400])
    with pytest.raises(RequestError,
                       match="inputs.fixed\\[0\\]: truncated: 400 of the 3,232 bytes"):
        decode_volume(b64(raw), "inputs.fixed[0]")


def request_fields(volume, count=2, label=True):
    fields = {"fixed": [encode_volume(volume + i, AFFINE) for i in range(count)],
              "moving": [encode_volume(volume - i, None, "npy") for i in range(count)]}
    if label:
        fields["moving_label"] = [encode_volume(volume > i, AFFINE) for i in range(count)]
    return fields


def check_pairs(pairs, volume):
    assert len(pairs) == 2
    for index, pair in enumerate(pairs):
        np.testing.assert_array_equal(pair["fixed"], volume + index)
        np.testing.assert_array_equal(pair["moving"], volume - index)
        assert pair["moving_label"].shape == (1, 9, 10, 8)
        np.testing.assert_array_equal(pair["moving_label"][0], volume > index)
        np.testing.assert_allclose(pair["fixed_affine"], AFFINE)
        assert pair["moving_affine"] is None and pair["encoding"] == "nii.gz"


def test_parse_request_forms_mlflow_passes_to_predict(volume):
    fields = request_fields(volume)
    check_pairs(parse_request({"inputs": fields}), volume)  # raw JSON body
    check_pairs(parse_request({k: np.array(v) for k, v in fields.items()}), volume)  # no signature
    check_pairs(parse_request(pd.DataFrame(fields)), volume)  # dataframe_split / _records


def test_parse_request_without_label_and_scalar_string(volume):
    fields = request_fields(volume, count=1, label=False)
    pairs = parse_request({key: np.array(values[0]) for key, values in fields.items()})
    assert len(pairs) == 1 and pairs[0]["moving_label"] is None


def test_missing_label_entry_in_dataframe_means_no_label(volume):
    fields = request_fields(volume)
    fields["moving_label"][1] = None
    pairs = parse_request(pd.DataFrame(fields))
    assert pairs[0]["moving_label"] is not None and pairs[1]["moving_label"] is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("moving"), "inputs: missing field\\(s\\) moving"),
        (lambda f: f.update(fixd=["x"]), "inputs: unknown field\\(s\\) fixd"),
        (lambda f: f["moving"].pop(), "inputs.moving: 1 volumes but inputs.fixed has 2"),
        (lambda f: f.update(fixed=[]), "inputs.fixed: empty list"),
        (lambda f: f.update(fixed=7), "inputs.fixed: expected a list of base64 strings"),
        (lambda f: f["moving"].__setitem__(1, "%%%"), "inputs.moving\\[1\\]: not valid base64"),
        (lambda f: f["moving_label"].__setitem__(0, encode_volume(np.zeros((9, 10, 7)), None)),
         "inputs.moving_label\\[0\\]: shape \\(9, 10, 7\\) does not match inputs.moving\\[0\\]"),
    ],
)
def test_malformed_request_names_the_field(volume, change, message):
    fields = request_fields(volume)
    change(fields)
    with pytest.raises(RequestError, match=message):
        parse_request({"inputs": fields})


def test_request_that_is_not_a_mapping():
    with pytest.raises(RequestError, match="inputs: expected a mapping"):
        parse_request(["abc"])


def test_encoded_results_join_and_round_trip(volume):
    ddf = np.stack([volume, volume, volume])
    results = [{"ddf": ddf, "warped": volume[None], "warped_label": (volume > 0)[None],
                "affine": AFFINE},
               {"ddf": ddf, "warped": volume, "affine": AFFINE}]
    response = join_results([encode_result(result, "nii.gz") for result in results])
    assert set(response) == {"ddf", "warped", "warped_label"}
    assert response["warped_label"][1] is None
    decoded_ddf, affine, _ = decode_volume(response["ddf"][0], "ddf", channels=True)
    np.testing.assert_array_equal(decoded_ddf, ddf)
    np.testing.assert_allclose(affine, AFFINE)
    warped, _, _ = decode_volume(response["warped"][0], "warped")
    np.testing.assert_array_equal(warped, volume)
    label, _, _ = decode_volume(response["warped_label"][0], "warped_label", channels=True)
    np.testing.assert_array_equal(label, (volume > 0)[None])


def test_an_answer_ddf_is_stored_uncompressed_and_the_images_compressed():
    """A DDF barely compresses, so its .nii.gz uses stored gzip blocks (the raw NIfTI bytes plus
    gzip's framing); a smooth warped image is still compressed; both decode exactly."""
    grid = np.indices((16, 24, 16)).sum(0).astype(np.float32)
    ddf = np.random.default_rng(3).normal(size=(3, 16, 24, 16)).astype(np.float32)
    encoded = encode_result({"ddf": ddf, "warped": grid, "affine": AFFINE}, "nii.gz")
    ddf_file = base64.b64decode(encoded["ddf"])
    raw = gzip.decompress(ddf_file)
    assert len(raw) < len(ddf_file) < len(raw) + 1024
    warped_file = base64.b64decode(encoded["warped"])
    assert len(warped_file) < len(gzip.decompress(warped_file)) / 4
    np.testing.assert_array_equal(decode_volume(encoded["ddf"], "ddf", channels=True)[0], ddf)
    np.testing.assert_array_equal(decode_volume(encoded["warped"], "warped")[0], grid)


def test_per_pair_encoding_and_no_ddf(volume):
    results = [{"warped_label": volume[None]}, {"warped_label": volume[None]}]
    response = join_results([encode_result(result, encoding) for result, encoding
                             in zip(results, ["npy", "nii.gz"], strict=True)])
    assert list(response) == ["warped_label"]
    assert [decode_volume(text, "x")[2] for text in response["warped_label"]] == ["npy", "nii.gz"]


def nifti_header_only(shape, dtype=np.float32) -> bytes:
    """The 352 bytes of a NIfTI-1 file (header + empty extension flag) declaring ``shape``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * 4


def npy_header_only(shape, dtype="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def peak_bytes(function) -> int:
    """Peak Python-traced allocation while ``function()`` runs (numpy/zlib buffers included)."""
    tracemalloc.start()
    try:
        function()
    except RegflowError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_volume_over_the_voxel_limit_is_refused_from_its_header_alone():
    # a 1.4 MB .nii.gz (gzip members of 1 MiB of zeros each) that inflates to 700^3 float32
    member = gzip.compress(b"\0" * 2**20, compresslevel=9)
    zeros = gzip.compress(nifti_header_only((700, 700, 700))) + member * 1309
    text = b64(zeros)
    assert 1.0e6 < len(zeros) < 1.5e6
    with pytest.raises(RequestTooLarge, match=(
            r"inputs.moving\[0\]: shape \(700, 700, 700\) is 343,000,000 voxels, over the "
            r"limit of 16,777,216 per volume \(REGFLOW_MAX_VOXELS\)")):
        decode_volume(text, "inputs.moving[0]")
    assert peak_bytes(lambda: decode_volume(text, "inputs.moving[0]")) < 3 * len(text)


def test_gzip_bomb_stops_inflating_at_the_size_its_header_declares():
    declared = nifti_header_only((64, 64, 64))  # 1 MiB of float32 declared
    bomb = b64(gzip.compress(declared + b"\0" * (64 * 2**20), compresslevel=9))
    assert len(bomb) < 100_000
    with pytest.raises(RequestTooLarge, match=(
            r"inputs.fixed\[0\]: gzip data inflates past the 1,048,928 bytes its NIfTI header "
            r"declares \(inflating stops there; REGFLOW_MAX_VOXELS bounds it\)")):
        decode_volume(bomb, "inputs.fixed[0]")
    assert peak_bytes(lambda: decode_volume(bomb, "inputs.fixed[0]")) < 4 * 2**20


def test_npy_over_the_limit_or_truncated_is_refused_before_reading():
    small = Limits(max_voxels=1000)
    with pytest.raises(RequestTooLarge, match=r"v: shape \(700, 700, 700\) is 343,000,000"):
        decode_volume(b64(npy_header_only((700, 700, 700))), "v")
    with pytest.raises(RequestTooLarge, match=r"v: shape \(11, 10, 10\) is 1,100 voxels, over "
                                              r"the limit of 1,000"):
        decode_volume(b64(npy_header_only((11, 10, 10))), "v", limits=small)
    with pytest.raises(RequestError, match=r"v: truncated: 128 of the 4,128 bytes"):
        decode_volume(b64(npy_header_only((10, 10, 10))), "v", limits=small)


def test_channel_limit_names_its_variable(volume):
    label = np.stack([volume > threshold for threshold in (-1, 0, 1)])  # (3, D, H, W)
    with pytest.raises(RequestTooLarge, match=r"lab: 3 channels, over the limit of 2 per volume "
                                              r"\(REGFLOW_MAX_CHANNELS\)"):
        decode_volume(encode_volume(label, AFFINE), "lab", channels=True,
                      limits=Limits(max_channels=2))


@pytest.mark.parametrize("encoding", ["nii.gz", "npy"])
def test_one_hot_and_soft_labels_keep_their_values(volume, encoding):
    classes = np.digitize(volume, [-0.5, 0.5])  # (D, H, W) in {0, 1, 2}
    one_hot = np.stack([classes == value for value in range(3)]).astype(np.float32)
    soft = np.clip(volume, 0, 1)[None] * np.array([0.25, 0.75], np.float32)[:, None, None, None]
    integer_map = classes.astype(np.float32) * 7  # values 0, 7, 14: not rounded or binarised
    for label in (one_hot, soft, integer_map[None]):
        decoded, _, _ = decode_volume(encode_volume(label, AFFINE, encoding), "lab", channels=True)
        assert decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, label)
    assert set(np.unique(soft)) > {0.0, 0.25, 0.75}


def test_nifti_vector_label_and_nifti2_and_fortran_npy(volume):
    vectors = np.stack([volume, -volume], axis=-1)[:, :, :, None]  # (D, H, W, 1, 2)
    decoded, _, _ = decode_volume(b64(nib.Nifti2Image(vectors, AFFINE).to_bytes()), "v",
                                  channels=True)
    np.testing.assert_array_equal(decoded, np.stack([volume, -volume]))
    fortran = np.asfortranarray(volume.astype(">f8"))
    decoded, _, _ = decode_volume(npy_text(fortran), "v")
    np.testing.assert_array_equal(decoded, volume)


def test_multi_member_gzip_is_read_whole(volume):
    raw = nib.Nifti1Image(volume, AFFINE).to_bytes()
    members = gzip.compress(raw[:500]) + gzip.compress(raw[500:])
    decoded, affine, _ = decode_volume(b64(members), "v")
    np.testing.assert_array_equal(decoded, volume)
    np.testing.assert_allclose(affine, AFFINE)


def test_too_many_pairs_are_refused_before_any_volume_is_read():
    garbage = ["not base64 at all"] * 3
    with pytest.raises(RequestTooLarge, match=r"inputs: 3 pairs, over the limit of 2 per request "
                                              r"\(REGFLOW_MAX_PAIRS\); send several requests"):
        parse_request({"fixed": garbage, "moving": garbage}, limits=Limits(max_pairs=2))


def test_every_header_is_checked_before_any_pair_is_decoded(volume):
    fields = request_fields(volume, label=False)
    fields["fixed"][0] = encode_volume(np.full_like(volume, np.nan), AFFINE)  # found on decoding
    fields["moving"][1] = b64(npy_header_only((20, 20, 20)))  # found from the header
    pairs = read_request(fields, Limits(max_voxels=8000))
    assert [pair.encoding for pair in pairs] == ["nii.gz", "nii.gz"]
    with pytest.raises(RequestTooLarge, match=r"inputs.moving\[1\]: shape \(20, 20, 20\)"):
        read_request(fields, Limits(max_voxels=7999))
    with pytest.raises(RequestError, match=r"inputs.fixed\[0\]: contains NaN"):
        pairs[0].decode()


@pytest.mark.parametrize("label", [None, np.array(None), float("nan"), [None, None]])
def test_null_label_means_no_label(volume, label):
    fields = {**request_fields(volume, label=False), "moving_label": label}
    pairs = parse_request({"inputs": fields})
    assert [pair["moving_label"] for pair in pairs] == [None, None]
    np.testing.assert_array_equal(pairs[1]["moving"], volume - 1)


def test_null_required_field_is_missing(volume):
    fields = {**request_fields(volume, label=False), "fixed": None}
    with pytest.raises(RequestError, match=r"^inputs: missing field\(s\) fixed$"):
        parse_request(fields)


def test_unknown_field_names_are_cut_short_in_the_message(volume):
    fields = {**request_fields(volume), "x" * 10_000: ["a"], **{f"extra{i}": [] for i in range(9)}}
    with pytest.raises(RequestError) as caught:
        parse_request({"inputs": fields})
    message = str(caught.value)
    assert message.startswith("inputs: unknown field(s) " + "x" * 40 + "..., extra0, extra1")
    assert message.endswith(" and 5 more; expected fixed, moving, moving_label, refine_steps")
    assert len(message) < 200

