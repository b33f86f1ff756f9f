#!/usr/bin/env python3
"""submit.py ADMIN_KIT JOB_DIR [--timeout S] [--clients site-1,site-2] [--started FILE] [--shutdown]

The project admin's side of a FLARE run, through FLARE's admin API (flare_api): wait until
every client is registered, submit the job, monitor it to the end, download its result and
prove that every client contributed ("Contribution from SITE ACCEPTED by the aggregator" in
the server's job log), optionally shut every site down. Prints one JSON line; exit 0 only
for FINISHED:COMPLETED with every client's contribution.
"""
import argparse
import glob
import json
import os
import re
import sys
import time

from nvflare.fuel.flare_api.flare_api import new_secure_session

ap = argparse.ArgumentParser()
ap.add_argument("admin_kit")
ap.add_argument("job_dir")
ap.add_argument("--user", default="admin@nvidia.com")
ap.add_argument("--timeout", type=float, default=300)
ap.add_argument("--clients", default="site-1,site-2")
ap.add_argument("--result-dir", default=None)
ap.add_argument("--started", default=None, help="touch this file once the job is submitted")
ap.add_argument("--shutdown", action="store_true")
a = ap.parse_args()
want = set(a.clients.split(","))
t0 = time.time()
deadline = t0 + a.timeout
sess = None
while sess is None:
    try:
        sess = new_secure_session(a.user, a.admin_kit, timeout=10)
    except Exception as e:  # the server is not up yet
        if time.time() > deadline:
            sys.exit(f"submit.py: cannot connect to the server's admin port: {e}")
        time.sleep(1)
while True:
    names = {c.name for c in sess.get_system_info().client_info}
    if want <= names:
        break
    if time.time() > deadline:
        sys.exit(f"submit.py: clients never registered: {sorted(want - names)}")
    time.sleep(1)
t_ready = time.time()
job_id = sess.submit_job(a.job_dir)
t_sub = time.time()
if a.started:
    open(a.started, "w").close()
rc = sess.monitor_job(job_id, timeout=max(1, deadline - time.time()), poll_interval=0.5)
t_done = time.time()
status = sess.get_job_meta(job_id).get("status")
out = {
    "job_id": job_id,
    "monitor": str(rc),
    "status": status,
    "clients_ready_s": round(t_ready - t0, 2),
    "job_wall_s": round(t_done - t_sub, 2),
}
seen = set()
try:
    loc = sess.download_job_result(job_id, destination=a.result_dir) if a.result_dir else sess.download_job_result(job_id)
    for log in glob.glob(os.path.join(loc, "**", "log.txt"), recursive=True):
        with open(log) as f:
            for m in re.finditer(r"Contribution from (\S+) ACCEPTED by the aggregator at round (\d+)", f.read()):
                seen.add((m.group(1), int(m.group(2))))
except Exception as e:
    out["download_error"] = repr(e)
out["contributions"] = sorted(f"{site}@round{r}" for site, r in seen)
out["all_contributed"] = bool(seen) and want <= {site for site, _ in seen}
if a.shutdown:
    ts = time.time()
    try:
        sess.shutdown("all", wait=True, timeout=60)
        out["shutdown_s"] = round(time.time() - ts, 2)
    except Exception as e:
        out["shutdown_error"] = repr(e)
else:
    sess.close()
print(json.dumps(out), flush=True)
sys.exit(0 if status == "FINISHED:COMPLETED" and out["all_contributed"] else 1)
