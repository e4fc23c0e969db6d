"""URL tables -> WebDataset shards with the real img2dataset, against an HTTP server on 127.0.0.1 serving demo
images, some URLs missing (404), slow (past the timeout) or corrupt; then recaption and train on the shards.

img2dataset is found as `$ALIP_IMG2DATASET` or on PATH (.ci/run installs it in its own venv); without it the
download tests are skipped.
"""

import http.server
import json
import threading
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from alip_hf import web
from alip_hf.data import load_source
from alip_hf.resources import DEMO_DATA

GOOD, SLOW_SECONDS, TIMEOUT = 9, 4, 1


def _img2dataset() -> str:
    try:
        return web.find_img2dataset()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def server():
    """Serves `GOOD` demo images at /img/<i>.jpg, a slow one, a corrupt one; anything else is a 404."""
    rows = pq.read_table(sorted(DEMO_DATA.glob("train-*.parquet"))[0], columns=["id", "image", "alt_text"]).slice(
        0, GOOD).to_pylist()
    files = {f"/img/{i}.jpg": row["image"]["bytes"] for i, row in enumerate(rows)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/slow"):
                time.sleep(SLOW_SECONDS)
                body = files["/img/0.jpg"]
            elif self.path.startswith("/corrupt"):
                body = b"\xff\xd8\xff\xe0 these bytes are not a JPEG"
            elif self.path in files:
                body = files[self.path]
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield {"base": base, "titles": [row["alt_text"] for row in rows]}
    httpd.shutdown()


def _vecap_json(path, server) -> dict[str, str]:
    """A file in VeCap-300M's layout: one JSON object {image url: caption}."""
    base = server["base"]
    captions = {f"{base}/img/{i}.jpg": f"{title} (caption {i})" for i, title in enumerate(server["titles"])}
    captions.update({f"{base}/missing.jpg": "gone", f"{base}/slow.jpg": "too slow", f"{base}/corrupt.jpg": "broken"})
    path.write_text(json.dumps(captions))
    return captions


def test_vecap_json_csv_and_jsonl_tables_give_the_same_rows_with_stable_ids(tmp_path):
    captions = {"http://a/1.jpg": "one", "http://a/2.jpg": "two"}
    (tmp_path / "vecap.json").write_text(json.dumps(captions))
    pd.DataFrame({"url": list(captions), "caption": list(captions.values())}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"url": list(captions), "caption": list(captions.values())}).to_json(
        tmp_path / "t.jsonl", orient="records", lines=True)
    tables = [web.read_url_table([str(tmp_path / name)]) for name in ("vecap.json", "t.csv", "t.jsonl")]
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0])
    assert list(tables[0]["alt_text"]) == ["one", "two"] and tables[0]["id"].is_unique
    repeated = web.read_url_table([str(tmp_path / "t.csv"), str(tmp_path / "t.csv")])
    assert repeated["id"].is_unique and list(repeated["id"][:2]) == list(tables[0]["id"])


def test_missing_url_column_is_named(tmp_path):
    pd.DataFrame({"link": ["http://a"], "caption": ["x"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="url column 'url' not found.*'link'"):
        web.read_url_table([str(tmp_path / "t.parquet")])


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    program = _img2dataset()
    root = tmp_path_factory.mktemp("web")
    captions = _vecap_json(root / "wit_300m-00-of-10.json", server)
    args = web.DownloadArguments(tables=[str(root / "wit_300m-00-of-10.json")], output_dir=str(root / "out"),
                                 image_size=32, resize_mode="no", processes_count=1, thread_count=2, timeout=TIMEOUT,
                                 number_sample_per_shard=5, img2dataset=program)
    started = time.time()
    summary = web.download(args)
    return {"root": root, "args": args, "summary": summary, "captions": captions, "seconds": time.time() - started}


@pytest.mark.slow  # img2dataset in a subprocess, a slow URL past its timeout: 10-30 s
def test_download_counts_failures_by_reason_and_ids_join_back(downloaded):
    summary, out = downloaded["summary"], downloaded["root"] / "out"
    assert (summary["count"], summary["successes"]) == (GOOD + 3, GOOD)
    assert (summary["failed_to_download"], summary["failed_to_resize"]) == (2, 1)  # 404 + timeout; bad bytes
    assert summary["status"]["success"] == GOOD and sum(summary["status"].values()) == GOOD + 3
    assert json.loads((out / "download_summary.json").read_text()) == summary
    table = pd.read_parquet(out / "urls.parquet")
    failed = pd.read_parquet(out / "failed.parquet")
    assert sorted(failed["url"].str.rsplit("/", n=1).str[-1]) == ["corrupt.jpg", "missing.jpg", "slow.jpg"]
    shards = load_source(summary["shards"])
    ids = [meta["id"] for meta in shards["json"]]
    assert sorted(ids + list(failed["id"])) == sorted(table["id"])  # every id: downloaded or listed as failed
    by_id = dict(zip(table["id"], table["url"]))
    for meta, text in zip(shards["json"], shards["txt"]):  # each image kept its own URL's text
        assert text == downloaded["captions"][by_id[meta["id"]]]
    with pytest.raises(FileExistsError, match="mix two runs"):
        web.download(downloaded["args"])


@pytest.mark.slow  # recaption with a tiny captioner, then two tiny training runs
def test_recaption_and_train_on_the_downloaded_shards(downloaded, tiny_data, tmp_path):
    from recaption.caption import CaptionArguments, caption
    from recaption.arguments import GenerationArguments, RunArguments
    from _tiny_captioners import save_tiny_captioner

    from alip_hf import train

    summary = downloaded["summary"]
    out = tmp_path / "captioned"
    run = RunArguments(source=summary["shards"], output_dir=str(out), image_column="jpg", streaming=True,
                       shard_size=4)
    result = caption(run, CaptionArguments(model=save_tiny_captioner(str(tmp_path / "captioner"))),
                     GenerationArguments(batch_size=4, max_new_tokens=6, dtype="float32"))
    assert result["rows"] == GOOD
    captioned = load_source(str(out / "data"))
    assert sorted(captioned["id"]) == sorted(m["id"] for m in load_source(summary["shards"])["json"])
    assert all(captioned["caption"]) and not any(captioned["error"])

    common = ("--image_column", "jpg", "--text_column", "txt", "--per_device_train_batch_size", "4")
    train.main(tiny_data.argv(tmp_path / "alip", "--recipe", "alip", "--caption_column", "caption", *common,
                              data_file=out / "data"))
    train.main(tiny_data.argv(tmp_path / "clip", "--recipe", "clip", "--streaming", "true", *common,
                              data_file=summary["shards"]))
    assert (tmp_path / "alip" / "model.safetensors").exists() and (tmp_path / "clip" / "model.safetensors").exists()


# ---- the data contract on img2dataset's own shards: the id is `json.id` in every command, in both modes ----------


@pytest.mark.slow  # a tiny captioner, a tiny chat LM and a tiny ALIP model over the shards, map-style and streaming
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_every_recaption_step_runs_on_the_downloaded_shards_in_both_modes(downloaded, tmp_path, streaming):
    from conftest import tiny_alip_config
    from recaption.audit import AuditArguments, audit
    from recaption.caption import CaptionArguments, caption
    from recaption.arguments import GenerationArguments, RunArguments
    from recaption.rewrite import RewriteArguments, rewrite
    from _tiny_captioners import save_tiny_captioner, save_tiny_chat_lm

    from modeling_alip import ALIPModel, ALIPProcessor

    shards = downloaded["summary"]["shards"]
    expected = sorted(meta["id"] for meta in load_source(shards)["json"])
    alip = ALIPModel(tiny_alip_config())
    for gate in ("lcg.text_caption", "dcg.image_text", "dcg.image_caption"):  # as after training
        alip.gates.get_submodule(gate).running_mean.fill_(0.5)
    alip.save_pretrained(tmp_path / "alip")
    ALIPProcessor.from_config(alip.config).save_pretrained(tmp_path / "alip")
    generation = GenerationArguments(batch_size=4, max_new_tokens=6, dtype="float32")

    def run(name: str) -> RunArguments:
        return RunArguments(source=shards, output_dir=str(tmp_path / name), image_column="jpg", streaming=streaming,
                            shard_size=4)

    steps = {
        "caption": lambda: caption(run("caption"), CaptionArguments(model=save_tiny_captioner(str(tmp_path / "c"))),
                                   generation),
        # The shards hold one text (`txt`): it serves as web text and as caption.
        "rewrite": lambda: rewrite(run("rewrite"), RewriteArguments(model=save_tiny_chat_lm(str(tmp_path / "lm")),
                                                                    alt_text_column="txt", caption_column="txt"),
                                   generation),
        "audit": lambda: audit(run("audit"), AuditArguments(model=str(tmp_path / "alip"), text_column="txt",
                                                            caption_column="txt", batch_size=4, report=False)),
    }
    for name, step in steps.items():
        assert step()["rows"] == GOOD, name
        written = load_source(str(tmp_path / name / "data"))
        assert sorted(written["id"]) == expected, name  # joined on img2dataset's id, not the download's __key__


@pytest.mark.slow  # one tiny ALIP run and one audit over the shards
def test_train_log_and_audit_join_on_every_row_of_the_downloaded_shards(downloaded, tiny_data, tmp_path):
    """train.py --log_sample_weights and recaption.audit --sample_weights read the same id (`json.id`)."""
    from recaption.audit import AuditArguments, audit
    from recaption.arguments import RunArguments

    from alip_hf import train

    shards = downloaded["summary"]["shards"]
    # 9 rows in batches of 3: one epoch of 3 steps, the last epoch holds every row.
    train.main(tiny_data.argv(tmp_path / "run", "--recipe", "alip", "--image_column", "jpg", "--text_column", "txt",
                              "--caption_column", "txt", "--per_device_train_batch_size", "3", "--max_steps", "3",
                              "--log_sample_weights", data_file=shards))
    logged = pq.read_table(tmp_path / "run" / "sample_weights").column("id").to_pylist()
    assert sorted(logged) == sorted(meta["id"] for meta in load_source(shards)["json"])
    audit(RunArguments(source=shards, output_dir=str(tmp_path / "audit"), image_column="jpg", shard_size=4),
          AuditArguments(sample_weights=str(tmp_path / "run" / "sample_weights"), text_column="txt",
                         caption_column="txt", report=False))
    audited = load_source(str(tmp_path / "audit" / "data"))
    assert len(audited) == GOOD and not any(audited["error"])  # no row "not_logged"
