#!/usr/bin/env python3
"""Writes backend/ui/world.js, the land outlines of the dashboard's fleet map.

Run once at development time (the dashboard needs no network at runtime):

    cd /tmp && npm pack world-atlas@2 && tar xzf world-atlas-2.*.tgz
    python3 backend/ui/tools/make-world.py /tmp/package/land-110m.json > backend/ui/world.js

It decodes the TopoJSON (quantized, delta-encoded arcs joined into rings), rounds each
point to 0.1 degree, drops repeated points and rings too small to draw, and writes each
ring as a flat list of integers: longitude and latitude in tenths of a degree.

The topology is spherical: a ring that crosses the antimeridian jumps from +180 to
-180. For a flat map each such ring is unwrapped (its longitudes made continuous, so
they may run past +-180) and written again shifted by 360 degrees, so the map, which
clips at its edges, shows both halves; a ring around a pole (Antarctica) is closed
along the pole's latitude.
"""

import json
import sys


def decode_arcs(topo):
    (sx, sy), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
    arcs = []
    for arc in topo["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x += dx
            y += dy
            points.append((x * sx + tx, y * sy + ty))
        arcs.append(points)
    return arcs


def ring_points(arcs, indexes):
    ring = []
    for i in indexes:
        arc = arcs[i] if i >= 0 else list(reversed(arcs[~i]))
        ring.extend(arc if not ring else arc[1:])
    return ring


def rounded(ring):
    out = []
    for lon, lat in ring:
        p = (round(lon * 10), round(lat * 10))
        if not out or out[-1] != p:
            out.append(p)
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return out


def flat_rings(ring):
    """The ring unwrapped, closed around a pole if it goes round one, and its copies
    shifted by 360 degrees that reach into -180..180."""
    lon = [ring[0][0]]
    for (a, _), (b, _) in zip(ring, ring[1:]):
        d = b - a
        d -= 3600 if d > 1800 else -3600 if d < -1800 else 0
        lon.append(lon[-1] + d)
    out = [(x, y) for x, (_, y) in zip(lon, ring)]
    back = ring[0][0] - ring[-1][0]
    back -= 3600 if back > 1800 else -3600 if back < -1800 else 0
    turn = lon[-1] + back - lon[0]
    if turn:
        pole = -900 if sum(y for _, y in ring) < 0 else 900
        out += [(lon[0] + turn, ring[0][1]), (lon[0] + turn, pole), (lon[0], pole)]
    lo, hi = min(x for x, _ in out), max(x for x, _ in out)
    return [
        [(x + k * 3600, y) for x, y in out]
        for k in (0, -1, 1)
        if lo + k * 3600 < 1800 and hi + k * 3600 > -1800
    ]


def main(path):
    topo = json.load(open(path))
    arcs = decode_arcs(topo)
    rings = []
    for geom in topo["objects"]["land"]["geometries"]:
        polygons = geom["arcs"] if geom["type"] == "MultiPolygon" else [geom["arcs"]]
        for polygon in polygons:
            for ring in polygon:
                r = rounded(ring_points(arcs, ring))
                if len(r) >= 3:
                    rings.extend(flat_rings(r))
    print("// Land outlines for the dashboard's fleet map: Natural Earth's 1:110m land")
    print("// (public domain, https://www.naturalearthdata.com), by way of the npm package")
    print("// world-atlas@2 (land-110m.json, ISC licence, Mike Bostock). Written by")
    print("// backend/ui/tools/make-world.py: each ring a flat list of longitude, latitude")
    print("// pairs in tenths of a degree (WGS 84), rounded to 0.1 degree.")
    print('"use strict";')
    print()
    print("const WORLD_LAND = [")
    for r in rings:
        print("[" + ",".join(f"{x},{y}" for x, y in r) + "],")
    print("];")
    print(f"// {len(rings)} rings, {sum(len(r) for r in rings)} points.", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
