"""What only the second kernel can show, run inside the VM by
tests/kernel/vm.py (`make test-kernel`): the server on Debian's 6.1 names
exactly the features that kernel lacks, in `status --json`, and its start
says what they cost. Skipped anywhere else."""
import json
import os

import pytest

from ..conftest import uffdsrv

pytestmark = pytest.mark.skipif(os.environ.get("UFFDSRV_KERNEL_VM") != "1",
                                reason="runs inside the second-kernel VM (make test-kernel)")


def test_status_json_names_what_this_kernel_lacks(server):
    expected = [n for n in os.environ.get("UFFDSRV_EXPECT_MISSING", "").split(",") if n]
    reply = json.loads(uffdsrv("status", "--socket", server.socket, "--json").stdout)
    k = reply["kernel"]
    assert k["release"] == os.uname().release
    assert sorted(k["missing"]) == sorted(expected), k
    assert all(k["features"][n] is False for n in expected)
    assert all(v for n, v in k["features"].items() if n not in expected), k
    log = server.log_text()
    assert f"kernel {k['release']} lacks" in log, log
    assert "one madvise per merged range" in log, log
    print(f"\n{k['release']}: uffd features {k['uffd_features']:#x}, missing "
          f"{', '.join(k['missing'])}")


def test_swap_io_never_asks_for_dontcache_here(server):
    # RWF_DONTCACHE is 6.14+: the swap file must take O_DIRECT (the scratch
    # disk is ext4) or the buffered fallback, never a flag 6.1 refuses
    io_mode = server.status()["swap"]["io_mode"]
    assert io_mode in ("direct", "buffered"), io_mode
