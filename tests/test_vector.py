"""Scene polygons (``segment --scene --vector``): regions merged across blocks, areas, CRS, files."""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from rasterio import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from simfeatup.cli import main
from simfeatup.constants import NODATA_LABEL
from simfeatup.scene import SceneBlock, block_boxes
from simfeatup.vector import RegionPolygons, VectorOutput, area_unit

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "geo" / "spacenet4_atlanta_pan.tif"
CRS_UTM = CRS.from_epsg(32616)  # the sample's
TRANSFORM = Affine(0.5, 0, 733601.0, 0, -0.5, 3725139.0)  # 0.5 m pixels: 0.25 m2 each
CLASSES = ["building,roof", "road", "tree", "water"]


def _labels(height=300, width=340, seed=0):
    """Blobs of 4 classes, salt noise, a nodata band at the top and a nodata hole."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(CLASSES), (height // 12 + 1, width // 12 + 1)).astype(np.uint8)
    labels = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_NEAREST)
    noise = rng.random((height, width)) < 0.03
    labels[noise] = rng.integers(0, len(CLASSES), noise.sum())
    labels[:20] = NODATA_LABEL
    labels[150:170, 200:260] = NODATA_LABEL
    return labels


def _write(path, labels, block, fmt="gpkg", crs=CRS_UTM, transform=TRANSFORM, **options):
    out = VectorOutput(path, fmt, height=labels.shape[0], width=labels.shape[1], crs=crs, transform=transform,
                       classes=CLASSES, **options)
    for y0, y1, x0, x1 in block_boxes(*labels.shape, block):
        out.write(SceneBlock(y0, y1, x0, x1, labels[y0:y1, x0:x1], None, labels[y0:y1, x0:x1] != NODATA_LABEL))
    return out.commit()


def _read(path):
    meta, _, wkb, fields = pyogrio.raw.read(path)
    columns = dict(zip(meta["fields"], fields))
    return meta, shapely.from_wkb(wkb), columns


def _components(labels):
    """Number of 4-connected regions of each class."""
    return sum(cv2.connectedComponents((labels == k).view(np.uint8), connectivity=4)[0] - 1
               for k in range(len(CLASSES)))


def test_polygons_do_not_depend_on_the_block_size(tmp_path):
    labels = _labels()
    written = [_read(_write(tmp_path / f"b{block}.gpkg", labels, block)) for block in (112, 224, 1792)]
    _, reference, ref_fields = written[-1]  # one block: nothing to merge
    assert len(reference) == _components(labels)
    for _, polygons, fields in written[:-1]:
        assert len(polygons) == len(reference)
        assert list(shapely.to_wkb(polygons)) == list(shapely.to_wkb(reference))  # same vertices, same order
        for name in ("class", "class_index", "area", "area_unit"):
            assert list(fields[name]) == list(ref_fields[name])


def test_regions_are_4_connected_and_merged_across_block_corners():
    labels = np.zeros((224, 224), np.uint8)
    labels[111, 111] = labels[112, 112] = 1  # touch at a corner only, across 4 blocks: 2 regions
    labels[100:124, 50:60] = 2  # crosses the edge between two blocks: 1 region
    labels[105:119, 150:164] = 3  # spans the corner of all four blocks: 1 region
    regions = RegionPolygons(224, 224)
    for y0, y1, x0, x1 in block_boxes(224, 224, 112):
        regions.add(y0, x0, labels[y0:y1, x0:x1])
    polygons, classes = regions.regions()
    assert sorted(classes.tolist()) == [0, 1, 1, 2, 3]
    assert set(shapely.get_type_id(polygons)) == {3}  # every feature a single Polygon
    by_class = {k: [p for p, c in zip(polygons, classes) if c == k] for k in range(4)}
    assert [p.area for p in by_class[1]] == [1.0, 1.0]
    assert by_class[2][0].equals(shapely.box(50, 100, 60, 124)) and len(by_class[2][0].exterior.coords) == 5
    assert by_class[3][0].equals(shapely.box(150, 105, 164, 119)) and len(by_class[3][0].exterior.coords) == 5
    background = by_class[0][0]  # one hole per island, the two single pixels' holes touching at their corner
    assert len(background.interiors) == 4 and background.is_valid and background.area == 224 * 224 - 2 - 240 - 196


def test_gpkg_is_in_the_scene_crs_and_areas_add_up_to_the_labelled_pixels(tmp_path):
    labels = _labels()
    path = _write(tmp_path / "scene.gpkg", labels, 112)
    meta, polygons, fields = _read(path)
    assert CRS.from_user_input(meta["crs"]) == CRS_UTM and pyogrio.list_layers(path)[0][0] == "scene"
    valid = labels != NODATA_LABEL
    assert fields["area"].sum() == pytest.approx(valid.sum() * 0.25)
    np.testing.assert_allclose(fields["area"], shapely.area(polygons))  # unsimplified: the geometry's own area
    assert set(fields["area_unit"]) == {"m2"}
    for k, line in enumerate(CLASSES):
        mine = fields["class_index"] == k
        assert set(fields["class"][mine]) == {line}
        assert fields["area"][mine].sum() == pytest.approx((labels == k).sum() * 0.25)
    # nodata gives no polygon: the band at the top and the hole are outside every polygon
    union = shapely.union_all(polygons)
    top = shapely.box(733601.0, 3725139.0 - 10, 733601.0 + 170, 3725139.0)
    hole = shapely.box(733601.0 + 100, 3725139.0 - 85, 733601.0 + 130, 3725139.0 - 75)
    assert union.intersection(top).area == 0 and union.intersection(hole).area == 0


def test_an_all_nodata_scene_writes_an_empty_layer(tmp_path):
    labels = np.full((120, 250), NODATA_LABEL, np.uint8)
    meta, polygons, _ = _read(_write(tmp_path / "empty.gpkg", labels, 112))
    assert len(polygons) == 0 and CRS.from_user_input(meta["crs"]) == CRS_UTM


def test_min_area_drops_whole_regions_not_pieces(tmp_path):
    labels = _labels()
    _, everything, fields = _read(_write(tmp_path / "all.gpkg", labels, 1792))
    threshold = float(np.sort(fields["area"])[len(everything) // 2])  # the median region: it is kept (>=)
    for block in (112, 1792):
        _, kept, kept_fields = _read(_write(tmp_path / f"min{block}.gpkg", labels, block, min_area=threshold))
        assert (kept_fields["area"] >= threshold).all()
        assert len(kept) == (fields["area"] >= threshold).sum()
        assert list(shapely.to_wkb(kept)) == list(shapely.to_wkb(everything[fields["area"] >= threshold]))


def test_simplify_keeps_neighbours_sharing_their_borders(tmp_path):
    labels = _labels()
    _, plain, _ = _read(_write(tmp_path / "plain.gpkg", labels, 224))
    _, simple, fields = _read(_write(tmp_path / "simple.gpkg", labels, 224, simplify=2.0))
    assert len(simple) == len(plain) and shapely.is_valid(simple).all()
    assert shapely.get_num_coordinates(simple).sum() < 0.8 * shapely.get_num_coordinates(plain).sum()
    # a coverage still: no overlaps between neighbours (the union's area is the sum of the areas)
    assert shapely.union_all(simple).area == pytest.approx(shapely.area(simple).sum(), rel=1e-9)
    np.testing.assert_allclose(fields["area"], shapely.area(plain))  # the area is the pixels'


def test_geojson_is_lon_lat_inside_the_scene(tmp_path):
    labels = _labels()
    path = _write(tmp_path / "scene.geojson", labels, 224, fmt="geojson")
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc  # RFC 7946: WGS 84 lon/lat, no crs member
    coords = np.concatenate([np.concatenate([np.asarray(r) for r in f["geometry"]["coordinates"]])
                             for f in doc["features"]])
    height, width = labels.shape
    bounds = rasterio.transform.array_bounds(height, width, TRANSFORM)  # west, south, east, north
    west, south, east, north = transform_bounds(CRS_UTM, "EPSG:4326", *bounds, densify_pts=21)
    eps = 1e-6
    assert (coords[:, 0] >= west - eps).all() and (coords[:, 0] <= east + eps).all()
    assert (coords[:, 1] >= south - eps).all() and (coords[:, 1] <= north + eps).all()
    assert -84.49 < west < east < -84.47 and 33.63 < south < north < 33.65  # Atlanta
    assert len(doc["features"]) == _components(labels)
    props = doc["features"][0]["properties"]
    assert set(props) == {"class", "class_index", "area", "area_unit"} and props["area_unit"] == "m2"


def test_without_a_crs_coordinates_are_the_geotransforms_and_areas_pixels(tmp_path):
    labels = _labels(120, 130)
    meta, polygons, fields = _read(_write(tmp_path / "plain.gpkg", labels, 112, crs=None, transform=Affine.identity()))
    assert meta["crs"] is None and set(fields["area_unit"]) == {"px"}
    assert fields["area"].sum() == (labels != NODATA_LABEL).sum()
    assert shapely.total_bounds(polygons).tolist() == [0, 20, 130, 120]  # x = column, y = row
    # a geotransform without a CRS: the polygons lie where the label raster does (its geotransform), areas in pixels
    meta, polygons, fields = _read(_write(tmp_path / "local.gpkg", labels, 112, crs=None, transform=TRANSFORM))
    assert meta["crs"] is None and set(fields["area_unit"]) == {"px"}
    assert fields["area"].sum() == (labels != NODATA_LABEL).sum()
    x0, y0 = TRANSFORM * (0, 20)
    x1, y1 = TRANSFORM * (130, 120)
    assert shapely.total_bounds(polygons).tolist() == [x0, y1, x1, y0]
    with pytest.raises(ValueError, match="has no CRS: use --vector gpkg \\(the raster's own coordinates\\)"):
        VectorOutput(tmp_path / "plain.geojson", "geojson", height=120, width=130, crs=None,
                     transform=Affine.identity(), classes=CLASSES)


def test_area_units():
    assert area_unit(CRS_UTM, TRANSFORM) == (0.25, "m2")
    assert area_unit(CRS.from_epsg(2227), Affine(2, 0, 0, 0, -2, 0))[1] == "m2"  # US survey feet -> m2
    assert area_unit(CRS.from_epsg(2227), Affine(2, 0, 0, 0, -2, 0))[0] == pytest.approx(4 * 0.3048006096**2)
    assert area_unit(CRS.from_epsg(4326), Affine(0.001, 0, 0, 0, -0.002, 0)) == (pytest.approx(2e-6), "deg2")
    assert area_unit(None, Affine(3, 0, 0, 0, -3, 0)) == (1.0, "px")


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    labels = _labels(120, 130)

    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pyogrio.raw, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "scene.gpkg", labels, 112)
    assert list(tmp_path.iterdir()) == []


# --- through the command line, with the tiny registered model -------------------------------------


def _model(tiny_weights):
    name, weights = tiny_weights
    return ["--model", name, "--pretrained", str(weights)]


def test_segment_writes_polygons_matching_the_label_raster(tiny_weights, tmp_path):
    out = tmp_path / "out"
    argv = ["segment", str(SAMPLE), "--classes", "building,roof;road;tree", "--out", str(out), "--block", "224",
            "--vector", "gpkg", *_model(tiny_weights)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json", "spacenet4_atlanta_pan.gpkg", "spacenet4_atlanta_pan.tif"]
    meta, polygons, fields = _read(out / "spacenet4_atlanta_pan.gpkg")
    with rasterio.open(SAMPLE) as src, rasterio.open(out / "spacenet4_atlanta_pan.tif") as dst:
        assert CRS.from_user_input(meta["crs"]) == src.crs
        labels = dst.read(1)
        pixel = abs(src.transform.a * src.transform.e)
        assert shapely.union_all(polygons).bounds == pytest.approx(tuple(src.bounds))
    for k, line in enumerate(["building,roof", "road", "tree"]):
        mine = fields["class_index"] == k
        assert set(fields["class"][mine]) <= {line}
        assert fields["area"][mine].sum() == pytest.approx((labels == k).sum() * pixel)
    assert len(polygons) == sum(cv2.connectedComponents((labels == k).view(np.uint8), connectivity=4)[0] - 1
                                for k in range(3))


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vector", "gpkg", "--min-area", "-1"], "'-1' is not a finite number >= 0"),
        (["--vector", "gpkg", "--simplify", "x"], "'x' is not a finite number >= 0"),
        (["--vector", "shp"], "invalid choice: 'shp'"),
    ],
)
def test_bad_vector_flags_are_refused_by_the_parser(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(SAMPLE), "--classes", "a;b", "--out", str(tmp_path / "o"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_vector_problems_end_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((120, 150, 3), np.uint8)).save(plain)
    out = tmp_path / "out"
    # no model flags: the default backbone's weights are not here, so reaching the model would fail differently
    base = ["segment", "--classes", "a;b", "--out", str(out)]
    assert main([*base, str(SAMPLE), "--min-area", "5"]) == 2
    assert "--min-area and --simplify shape polygons: add --vector" in _one_line_error(capsys)
    assert main([*base, str(plain), "--scene", "--vector", "geojson"]) == 2
    assert "plain.png has no CRS and GeoJSON is longitude/latitude (RFC 7946): use --vector gpkg" in (
        _one_line_error(capsys))
    monkeypatch.setitem(sys.modules, "pyogrio", None)  # as if the geo extra were not installed
    assert main([*base, str(SAMPLE), "--vector", "gpkg"]) == 2
    assert '--vector needs pyogrio, which is not installed: pip install "simfeatup[geo]"' in _one_line_error(capsys)
    assert not out.exists()
