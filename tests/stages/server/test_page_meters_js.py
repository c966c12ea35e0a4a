"""The pages' new pure modules under Node.js: link rates from successive stats (link_rates.js),
ranks grouped by node (rank_nodes.js), the token passed on (access.js) and the message for
a page that may not use the camera or microphone (media_access.js). Runs only where
Node.js is installed (as test_page_js)."""

from __future__ import annotations

import json

import pytest
from test_page_js import NODE, run, runtime_stats

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js not installed")


# --- bandwidth per link ---

def test_link_rates_come_from_successive_totals_over_a_window(tmp_path):
    # One link, stats every 500 ms: 1 MB and 10 messages more each time, then a quiet spell.
    feeds = [(500 * i, {"a->b": {"bytes_sent": 1_000_000 * i, "messages_sent": 10 * i}}) for i in range(1, 11)]
    feeds += [(5500, {"a->b": {"bytes_sent": 10_000_000, "messages_sent": 100}})]
    [rows] = run(tmp_path, f"""
        import {{ LinkRates }} from "./link_rates.js";
        const rates = new LinkRates(3000);
        console.log(JSON.stringify({json.dumps(feeds)}.map(([t, hops]) => rates.update(hops, t)[0])));
    """)
    assert rows[0]["bytesPerS"] is None and rows[0]["messagesPerS"] is None  # one sample: no rate yet
    assert rows[1]["bytesPerS"] == 2_000_000 and rows[1]["messagesPerS"] == 20
    assert all(r["bytesPerS"] == 2_000_000 for r in rows[1:10])  # steady, whatever the window holds
    assert (rows[0]["from"], rows[0]["to"], rows[0]["bytes"], rows[0]["messages"]) == ("a", "b", 1_000_000, 10)
    # Quiet for the last 500 ms: the window (2.5 s .. 5.5 s) holds 5 MB over 3 s, so the
    # meter falls back gently instead of dropping to 0 on one idle interval.
    quiet = rows[10]
    assert quiet["bytesPerS"] == pytest.approx(5_000_000 / 3) and quiet["crossNode"] is None


def test_link_rates_survive_restarts_jitter_and_missing_figures(tmp_path):
    [out] = run(tmp_path, """
        import { LinkRates, linkTotal, linkEnds, rateTotals, megabytesPerS, perSecond } from "./link_rates.js";
        const r = new LinkRates(3000);
        const steps = [
          [0, { "x->y": { bytes_sent: 5000, messages_sent: 5 } }],
          [1000, { "x->y": { bytes_sent: 9000, messages_sent: 9 } }],
          [2000, { "x->y": { bytes_sent: 1000, messages_sent: 1 } }],          // a rank restarted
          [3000, { "x->y": { bytes_sent: 3000, messages_sent: 3 } }],
          [3000, { "x->y": { bytes_sent: 3500, messages_sent: 4 } }],          // same instant: newer wins
          [4000, { "x->y": { bytes_received: 4500, messages_received: 5, hop_ms: { p50: 1 } } }],  // receiver only
          [5000, {}],                                                          // the link is gone
          [6000, { "x->y": { bytes_sent: 4600 } }],                            // back: starts again
        ];
        const rows = steps.map(([t, hops]) => r.update(hops, t)[0] ?? null);
        console.log(JSON.stringify({
          rates: rows.map((row) => row && row.bytesPerS), msgs: rows.map((row) => row && row.messagesPerS),
          totals: [linkTotal({}, "bytes"), linkTotal({ bytes_sent: 7, bytes_received: 9 }, "bytes"),
                   linkTotal({ bytes_sent: "7", bytes_received: 9 }, "bytes")],
          ends: [linkEnds("ingest#0->vision#0"), linkEnds("server.recv>ingest.start"), linkEnds("solo")],
          sums: rateTotals([{ bytesPerS: 2e6, crossNode: true }, { bytesPerS: 1e6, crossNode: false },
                            { bytesPerS: null, crossNode: true }]),
          sumsUnknown: rateTotals([{ bytesPerS: 5, crossNode: null }]),
          texts: [megabytesPerS(0), megabytesPerS(612345), megabytesPerS(4_213_000), megabytesPerS(37_512_345),
                  megabytesPerS(null), perSecond(0), perSecond(19.64), perSecond(240.4), perSecond(undefined)],
        }));
    """)
    assert out["rates"] == [None, 4000, None, 2000, 2500, 1750, None, None]
    assert out["msgs"] == [None, 4, None, 2, 3, 2, None, None]
    assert out["totals"] == [0, 7, 9]  # zeros are left out by the runtime; the sender's count first
    assert out["ends"] == [["ingest#0", "vision#0"], ["server.recv", "ingest.start"], ["solo", ""]]
    assert out["sums"] == {"bytesPerS": 3e6, "crossNodeBytesPerS": 2e6}
    assert out["sumsUnknown"] == {"bytesPerS": 5, "crossNodeBytesPerS": None}
    assert out["texts"] == ["0.000", "0.612", "4.21", "37.5", "–", "0.0", "19.6", "240", "–"]


def test_links_name_their_nodes_when_the_runtime_does(tmp_path):
    hops = {"vision#0->generator#0": {"bytes_sent": 10, "src_node": "gpu-a", "dst_node": "gpu-b", "src_rank": 2},
            "ingest#0->vision#0": {"bytes_sent": 10, "src_node": "gpu-a", "dst_node": "gpu-a"},
            "half#0->known#0": {"bytes_sent": 10, "src_node": "gpu-a"}}
    [rows] = run(tmp_path, f"""
        import {{ LinkRates }} from "./link_rates.js";
        console.log(JSON.stringify(new LinkRates().update({json.dumps(hops)}, 0)));
    """)
    by_name = {r["name"]: (r["srcNode"], r["dstNode"], r["crossNode"]) for r in rows}
    assert by_name == {"vision#0->generator#0": ("gpu-a", "gpu-b", True), "ingest#0->vision#0": ("gpu-a", "gpu-a", False),
                       "half#0->known#0": ("gpu-a", None, None)}


def test_links_come_in_the_order_frames_flow(tmp_path):
    # As the runtime may send them: whichever rank reported first comes first.
    shuffled = ["generator#0->display#0", "vision#1->generator#0", "ingest#0->vision#1", "vision#0->generator#0",
                "ingest#0->vision#0"]
    [order, cycle, real] = run(tmp_path, f"""
        import {{ LinkRates }} from "./link_rates.js";
        const names = (hops) => new LinkRates().update(hops, 0).map((r) => r.name);
        const hops = (list) => Object.fromEntries(list.map((n) => [n, {{ bytes_sent: 1 }}]));
        console.log(JSON.stringify(names(hops({json.dumps(shuffled)}))));
        console.log(JSON.stringify(names(hops(["b->a", "a->b", "solo"]))));
        console.log(JSON.stringify(names({{ "vision#0->generator#0": {{ src_node: 0, dst_node: "0" }},
                                           "ingest#0->vision#0": {{}} }})));
    """)
    assert order == ["ingest#0->vision#0", "ingest#0->vision#1", "vision#0->generator#0", "vision#1->generator#0",
                     "generator#0->display#0"]
    assert cycle == ["solo", "a->b", "b->a"]  # a cycle keeps its names' order, after the rest
    assert real == ["ingest#0->vision#0", "vision#0->generator#0"]


def test_the_runtimes_stats_shape_gives_a_row_per_link(tmp_path):
    stats = runtime_stats()  # the double, shaped like runtime/aggregate.py's stats()
    [rows] = run(tmp_path, f"""
        import {{ LinkRates }} from "./link_rates.js";
        console.log(JSON.stringify(new LinkRates().update({json.dumps(stats["hops"])}, 0)));
    """)
    assert [r["name"] for r in rows] == list(stats["hops"])
    assert rows[0]["bytes"] == 123456 and rows[0]["messages"] == 120


# --- ranks by node ---

def test_ranks_group_by_node_from_stats_or_health(tmp_path):
    ranks = [{"rank": 2, "role": "vision", "alive": True, "last_seen_s": 0.2},
             {"rank": 0, "role": "server", "alive": True, "last_seen_s": 0.0, "node": "gpu-a"},
             {"rank": 3, "role": "display", "alive": False, "last_seen_s": 12.5},
             {"rank": 1, "role": "generator", "alive": True, "last_seen_s": 0.1},
             {"role": "no rank number"}]
    health = {"ok": False, "ranks": [{"rank": 1, "node": "gpu-b", "device": "cuda:0"},
                                     {"rank": 2, "node": "gpu-a", "device": "cuda:1"},
                                     {"rank": 3, "node": ""}, {"node": "no rank"}]}
    [out] = run(tmp_path, f"""
        import {{ groupByNode, placesFromHealth, needsPlaces, nodeOf, rankTitle }} from "./rank_nodes.js";
        const ranks = {json.dumps(ranks)};
        const places = placesFromHealth({json.dumps(health)});
        const grouped = groupByNode(ranks, places);
        console.log(JSON.stringify({{
          bare: groupByNode(ranks).map((g) => [g.node, g.ranks.map((r) => r.rank)]),
          needs: [needsPlaces(ranks), needsPlaces(ranks, places), needsPlaces([ranks[1]]), needsPlaces(null)],
          places: [...places.entries()],
          grouped: grouped.map((g) => [g.node, g.up, g.total, g.ranks.map((r) => r.rank)]),
          own: nodeOf({{ rank: 2, node: "stats-says" }}, places),
          titles: grouped.flatMap((g) => g.ranks.map(rankTitle)),
        }}));
    """)
    # Without /health only rank 0 names its node; the rest wait under "not reported".
    assert out["bare"] == [["gpu-a", [0]], [None, [1, 2, 3]]]
    assert out["needs"] == [True, True, False, False]  # rank 3 has no node anywhere: /health is asked again later
    assert out["places"] == [[1, {"node": "gpu-b", "device": "cuda:0"}], [2, {"node": "gpu-a", "device": "cuda:1"}]]
    # Nodes in the order of their lowest rank, ranks in order, the unplaced last.
    assert out["grouped"] == [["gpu-a", 2, 2, [0, 2]], ["gpu-b", 1, 1, [1]], [None, 0, 1, [3]]]
    assert out["own"] == "stats-says"  # the rank's own word first
    assert out["titles"] == ["rank 0, server: up, heard from 0.0 s ago", "rank 2, vision on cuda:1: up, heard from 0.2 s ago",
                             "rank 1, generator on cuda:0: up, heard from 0.1 s ago", "rank 3, display: down, silent for 12.5 s"]


def test_nodes_are_named_as_people_read_them(tmp_path):
    # torchrun numbers nodes; the runtime sends the number, as an int or a string.
    ranks = [{"rank": 0, "role": "server", "alive": True, "last_seen_s": 0, "node": "0", "clock_offset_ms": 0.0},
             {"rank": 1, "role": "vision", "alive": True, "last_seen_s": 0.48, "node": 1, "clock_offset_ms": -2.35}]
    [out] = run(tmp_path, f"""
        import {{ nodeName, groupByNode, rankTitle, placesFromHealth }} from "./rank_nodes.js";
        const groups = groupByNode({json.dumps(ranks)});
        console.log(JSON.stringify({{
          names: [0, 3, "0", " 12 ", "gpu-a", "", "  ", null, undefined, -1, 1.5, {{}}].map(nodeName),
          groups: groups.map((g) => g.node),
          titles: groups.flatMap((g) => g.ranks.map(rankTitle)),
          health: [...placesFromHealth({{ ranks: [{{ rank: 0, node: 0, device: "cpu" }}] }}).entries()],
        }}));
    """)
    assert out["names"] == ["node 0", "node 3", "node 0", "node 12", "gpu-a", None, None, None, None, None, None, None]
    assert out["groups"] == ["node 0", "node 1"]
    assert out["titles"] == ["rank 0, server: up, heard from 0.0 s ago; clock offset +0.0 ms",
                             "rank 1, vision: up, heard from 0.5 s ago; clock offset -2.4 ms"]
    assert out["health"] == [[0, {"node": "node 0", "device": "cpu"}]]


# --- token ---

def test_token_goes_on_the_socket_the_fetches_and_the_links(tmp_path):
    [out] = run(tmp_path, """
        import { tokenFrom, socketUrl, withAuth, linkWithToken, TOKEN } from "./access.js";
        import { refusedText } from "./connection.js";
        const auth = withAuth({ method: "POST", headers: { Accept: "application/json" } }, "t0k+/=");
        console.log(JSON.stringify({
          tokens: [tokenFrom("?token=abc&x=1"), tokenFrom("?x=1"), tokenFrom("?token="), tokenFrom(""), tokenFrom(undefined),
                   tokenFrom("?token=a%2Bb")],
          urls: [socketUrl({ protocol: "http:", host: "10.0.0.5:8765" }), socketUrl({ protocol: "https:", host: "m.example" }, "a+b&c"),
                 socketUrl({ protocol: "http:", host: "[::1]:8765" }, "abc")],
          auth: [auth.method, auth.headers.get("Authorization"), auth.headers.get("Accept")],
          noAuth: withAuth({ cache: "no-store" }, null),
          links: [linkWithToken("lipsync", "abc"), linkWithToken("./", "a b"), linkWithToken("x?y=1#top", "t"),
                  linkWithToken("lipsync", null)],
          pageToken: TOKEN,
          refused: [refusedText(401, false), refusedText(401, true), refusedText(403, false)],
        }));
    """)
    assert out["tokens"] == ["abc", None, None, None, None, "a+b"]
    assert out["urls"] == ["ws://10.0.0.5:8765/ws", "wss://m.example/ws?token=a%2Bb%26c", "ws://[::1]:8765/ws?token=abc"]
    assert out["auth"] == ["POST", "Bearer t0k+/=", "application/json"]
    assert out["noAuth"] == {"cache": "no-store"}
    assert out["links"] == ["lipsync?token=abc", "./?token=a%20b", "x?y=1&token=t#top", "lipsync"]
    assert out["pageToken"] is None  # no page here: no location, no token
    assert "needs a token: open this page as /?token=" in out["refused"][0]
    assert "did not accept the token" in out["refused"][1]
    assert "allowed_origins" in out["refused"][2]


# --- camera and microphone on a page that is not secure ---

def test_media_problem_says_what_to_do(tmp_path):
    remote = {"isSecureContext": False, "navigator": {},
              "location": {"protocol": "http:", "host": "192.168.1.5:8765", "port": "8765", "pathname": "/lipsync",
                           "search": "?token=abc"}}
    default_port = {"isSecureContext": False, "navigator": {},
                    "location": {"protocol": "http:", "host": "mirror.lan", "port": "", "pathname": "/", "search": ""}}
    local = {"isSecureContext": True, "navigator": {"mediaDevices": {"getUserMedia": None}}, "location": {}}
    [out] = run(tmp_path, f"""
        import {{ mediaProblem, textParts }} from "./media_access.js";
        const local = {json.dumps(local)};
        local.navigator.mediaDevices.getUserMedia = () => {{}};
        console.log(JSON.stringify({{
          remote: mediaProblem("microphone", {json.dumps(remote)}),
          defaultPort: mediaProblem("camera", {json.dumps(default_port)}),
          local: mediaProblem("camera", local),
          oldBrowser: mediaProblem("camera", {{ isSecureContext: true, navigator: {{}} }}),
          parts: textParts("open `http://localhost:8765/` or `x`"),
        }}));
    """)
    remote = out["remote"]
    assert remote["title"] == "No microphone on this address: it is not a secure page"
    assert "`http://192.168.1.5:8765` over plain HTTP" in remote["why"]
    assert "`http://localhost:8765/lipsync?token=abc`" in remote["steps"][0]  # same page, token kept
    assert "`ssh -L 8765:localhost:8765 <server>`, then open that same address" in remote["steps"][1]
    assert "`--tls-cert cert.pem --tls-key key.pem` (see the README)" in remote["steps"][2]
    assert "`https://192.168.1.5:8765/lipsync?token=abc`" in remote["steps"][2]
    # A server on port 80: the tunnel's local end on 8765, which needs no root.
    assert "`http://localhost/`" in out["defaultPort"]["steps"][0]
    assert "`ssh -L 8765:localhost:80 <server>`, then open `http://localhost:8765/`" in out["defaultPort"]["steps"][1]
    assert out["local"] is None
    assert out["oldBrowser"]["title"] == "No camera: this browser gives the page no media devices"
    assert out["parts"] == [{"text": "open "}, {"code": "http://localhost:8765/"}, {"text": " or "}, {"code": "x"}]
