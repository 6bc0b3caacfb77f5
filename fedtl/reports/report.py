"""The study report: one self-contained HTML page (figures embedded), plus the table as CSV and Markdown.

Built only from the study folder, so ``fedtl report DIR`` rebuilds it at any time.
"""

from __future__ import annotations

import base64
import html
import os
import time
from pathlib import Path

import torch

from fedtl.config import load_config
from fedtl.data.federated import LabelledImages, server_test_data
from fedtl.errors import StudyError
from fedtl.models.features import predict
from fedtl.reports import report_plots as plots
from fedtl.reports.interpret import confusion_matrix, final_model, saliency
from fedtl.reports.results import RunResult, StudyResults, load_results, table, target_accuracy, write_tables
from fedtl.run_folder import CONFIG_FILE, FINAL_ACCURACY, STUDY_FILE

REPORT_DIR = "report"
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
.wide{overflow-x:auto}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;
overflow:auto;font-size:12px}figure{display:inline-block;margin:1em}figcaption{font-size:13px;color:#555;
max-width:640px}img{max-width:100%}"""


def _final_model(run: RunResult) -> tuple[torch.nn.Module, LabelledImages]:
    """A run's final model (from its last checkpoint) and its server test set."""
    return final_model(run.dir), server_test_data(load_config(run.dir / CONFIG_FILE).data)


def interpretability(res: StudyResults, folder: Path) -> list[tuple[Path, str]]:
    """Confusion matrices of every configuration's final model (first seed), and (image backbones)
    saliency maps of the best configuration's model (and its from-scratch baseline) on one test
    image per style."""
    names = plots.short_names(res)
    first = {label: runs[0] for label, runs in res.configs.items()}
    finals = {label: _final_model(run) for label, run in first.items()}
    matrices = {}
    for label, (model, test) in finals.items():
        predicted = predict(model, test).argmax(1)
        matrices[names[label]] = confusion_matrix(predicted, test.y, int(test.y.max()) + 1)
    figures = [(plots.plot_confusions(matrices, folder / "confusion.png"),
                "Confusion matrices of each configuration's final model on the server's test set (first seed; "
                "rows: true class, normalised).")]
    best = max(first, key=lambda label: first[label].summary[FINAL_ACCURACY])
    model, test = finals[best]
    if test.tokens:  # token ids: gradient x input is a picture of images only
        return figures
    models = {f"{names[best]} pre-trained": model}
    if first[best].scratch is not None:
        models[f"{names[best]} scratch"] = _final_model(first[best].scratch)[0]
    picks = [test.style.index(s) for s in dict.fromkeys(test.style)]
    x, y = test.batch(torch.tensor(picks)), test.y[picks]
    maps = {name: saliency(m, x, y) for name, m in models.items()}
    captions = [f"{test.style[i]} ({int(test.y[i])})" for i in picks]
    figures.append((plots.plot_saliency(x, captions, maps, folder / "saliency.png"),
                    f"Saliency (gradient × input of the true class's logit) of the best configuration, {names[best]}, "
                    "on one test image per domain style; red raises the logit, blue lowers it."))
    return figures


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def build_report(study_dir: str | Path) -> Path:
    """Write ``report/index.html``, ``results.csv``, ``results.md`` and the figures; return the page.

    Raises
    ------
    StudyError
        If the folder holds no study, or no run of it has finished.
    """
    res = load_results(study_dir)
    if not res.configs:
        raise StudyError(f"no run of study {res.name!r} in {res.out} has finished yet: nothing to report")
    folder = res.out / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_tables(res, folder)
    header, rows = table(res)
    names = plots.short_names(res)
    figures = [
        (plots.plot_curves(res, folder / "curves.png"), "Test accuracy per round (mean over seeds)."),
        (plots.plot_scratch(res, folder / "scratch.png"), "Pre-trained vs from scratch: the transfer gain."),
        (plots.plot_epsilon(res, folder / "epsilon.png"), "Final accuracy against the privacy spent."),
        (plots.plot_bytes(res, folder / "bytes.png"), "Final accuracy against total communication."),
        (plots.plot_merge_error(res, folder / "lora-merge-error.png"),
         "LoRA: how far each round's merge lands from the mean of the clients' updates B·A (log scale; exact "
         "merges at the floor, 1e-12)."),
        (plots.plot_client_spread(res, folder / "clients.png"),
         "Each training client's accuracy on its own held-out images: the final global model's and, under a "
         "personalisation, the client's own model's (its local tensors or tuned head)."),
        (plots.plot_domains(res, folder / "domains.png"), "Final accuracy per domain (acquisition style)."),
        (plots.plot_adaptability(res, folder / "adaptability.png"),
         "Clients held out of training: the final model on their data, before and after their local fine-tuning."),
    ]
    figures = [(p, c) for p, c in figures if p is not None] + interpretability(res, folder)
    runs_html = "".join(
        f"<li>{names[label]} seed {r.seed}: <a href=\"{html.escape(os.path.relpath(r.dir, folder))}\">"
        f"{html.escape(os.path.relpath(r.dir, res.out))}</a>"
        + (f" (scratch: <a href=\"{html.escape(os.path.relpath(r.scratch.dir, folder))}\">"
           f"{html.escape(os.path.relpath(r.scratch.dir, res.out))}</a>)" if r.scratch else "") + "</li>"
        for label, runs in res.configs.items() for r in runs)
    table_html = "<table><tr><th>#</th>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(
        f"<tr><td>{names[row[0]]}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    ) + "</table>"
    study_file = (res.out / STUDY_FILE).read_text() if (res.out / STUDY_FILE).is_file() else ""
    missing = (f"<p><b>Not finished yet</b> ({len(res.missing)}): " + ", ".join(html.escape(m) for m in res.missing)
               + "</p>") if res.missing else ""
    skipped = ("<p><b>Skipped</b> (refused before the study ran):</p><ul>" + "".join(
        f"<li>{html.escape(s['label'])}: {html.escape(s['reason'])}</li>" for s in res.skipped) + "</ul>"
               ) if res.skipped else ""
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fedtl study {html.escape(res.name)}</title>
<style>{_CSS}</style></head><body>
<h1>Study: {html.escape(res.name)}</h1>
<p>Made by <code>{html.escape(res.command)}</code>; report built {time.strftime('%Y-%m-%d %H:%M:%S')} from
{html.escape(str(res.out))} (rebuild: <code>fedtl report {html.escape(str(res.out))}</code>).</p>
{missing}
<h2>Results</h2>
<p>Mean ± standard deviation over seeds. Transfer gain: final accuracy minus the from-scratch baseline's, seed by
seed. Efficiency columns: rounds, seconds and bytes until the test accuracy first reached
{target_accuracy(res):.3f}. Epsilon: the largest any client spent (∞: no DP). Client and personalised accuracy:
the global model, and each client's own model (its local tensors under FedPer/FedBN/FedRep, its tuned head under
FedBABU; the global model otherwise), on each training client's own test images. Travelling / model: the bytes a
client sends per round against sending the whole model.</p>
<div class="wide">{table_html}</div>
{skipped}
<h2>Figures</h2>
{"".join(f"<figure>{_img(p)}<figcaption>{html.escape(c)}</figcaption></figure>" for p, c in figures)}
<h2>Runs</h2><ul>{runs_html}</ul>
<h2>Study file</h2><pre>{html.escape(study_file)}</pre>
</body></html>
"""
    index = folder / "index.html"
    index.write_text(page)
    return index
