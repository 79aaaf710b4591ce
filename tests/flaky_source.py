"""An expert source for tests: RAM blobs, except that while `FlakySource.failing` is set every
fetch fails as a dead expert host would. Pass the class itself as Engine.open's `source`."""

from common.errors import HostError
from common.store.reader import ExpertStore
from coordinator.sources.local import RamSource


class FlakySource:
    failing = False

    def __init__(self, store, fetch_loop) -> None:
        self.inner = RamSource(ExpertStore(store.folder), pin=False, progress=False)
        self.name = "flaky"
        self.blob_nbytes = self.inner.blob_nbytes

    def resident_blob(self, eid):
        return None

    async def fetch_into(self, eid, out) -> None:
        if FlakySource.failing:
            raise HostError(f"10.0.0.9:50051: no answer for {eid}")
        await self.inner.fetch_into(eid, out)

    def bytes_by_origin(self) -> dict[str, int]:
        return self.inner.bytes_by_origin()

    def close(self) -> None:
        self.inner.close()
