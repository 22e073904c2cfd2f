"""The public calls of every clinisynth service, written once (asyncio form).

async with clinisynth.AsyncClient() as client:     # finds the stack started by `clinisynth up`
    result = await client.generate("cells", class_name="neutrophil", n=4, seed=1)

This file is the source of both clients: ``scripts/gen_sync_client.py`` rewrites it token by
token (``async``/``await`` dropped, ``AsyncX`` → ``X``) into ``_sync_client.py``, the blocking
``Client``; a unit test checks the generated file is fresh. Requests are built, idempotency
declared and replies parsed by plain functions in the per-service modules, so each method here
only wires a declaration to the transport; see ``_rpc`` for why.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from clinisynth import _audit as au
from clinisynth import _counterfactual as cf
from clinisynth import _finetune as ft
from clinisynth import _generator as gen
from clinisynth import _models as md
from clinisynth import _reward as rw
from clinisynth._counterfactual import (
    CounterfactualBatchResult,
    CounterfactualResult,
    ItemCallback,
    PointCallback,
)
from clinisynth._discovery import SERVICES, Endpoints
from clinisynth._errors import ClinisynthError
from clinisynth._finetune import (
    Checkpoint,
    DatasetReport,
    FinetuneJob,
    JobEvent,
    JobKind,
    PromoteResult,
)
from clinisynth._images import ImageLike
from clinisynth._models import ModelDetails
from clinisynth._reward import (
    Agreement,
    Criterion,
    Feedback,
    FeedbackExport,
    ImageScore,
    ReviewBatch,
    ReviewItem,
    ScoreSummary,
)
from clinisynth._rpc import ProgressCallback, Rpc, progress_sink
from clinisynth._transport import DEFAULT_TIMEOUT, AsyncTransport, make_settings
from clinisynth._types import AuditEntry, GenerationResult, ModelInfo, PacsItem, ProgressEvent
from clinisynth.v1 import common_pb2, counterfactual_pb2, finetune_pb2, reward_pb2

Condition = str | dict[str, str] | None


class AsyncScoreStream:
    """Per-image scores of a streamed scoring run, in arrival order; ``summary`` at the end."""

    def __init__(
        self,
        events: AsyncIterator[reward_pb2.ScoreStreamEvent],
        on_progress: ProgressCallback | None,
    ) -> None:
        self._events = events
        self._folder = rw.StreamFolder(on_progress)

    @property
    def summary(self) -> ScoreSummary | None:
        """Images scored, mean reward and model version; ``None`` until the stream ended."""
        return self._folder.summary

    async def __aiter__(self) -> AsyncIterator[ImageScore]:
        async for event in self._events:
            score = self._folder.feed(event)
            if score is not None:
                yield score


class AsyncFeedbackCalls:
    """``client.feedback``: expert judgements."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def submit(
        self,
        image: ImageLike | None = None,
        *,
        rater_id: str,
        plausible: bool,
        condition: Condition = None,
        class_name: str | None = None,
        prompt: str | None = None,
        item_id: str | None = None,
        criteria: dict[str, bool] | None = None,
        comment: str = "",
        time_spent_ms: int = 0,
        generator: str | None = None,
        client_request_id: str | None = None,
        timeout: float | None = None,
    ) -> Feedback:
        """Store one judgement (an uploaded image, or a review ``item_id``).

        Idempotent on ``client_request_id`` (a fresh one is made when omitted), so it is retried
        on UNAVAILABLE; a retry that reached the store returns ``duplicate=True``.
        """
        req = rw.submit_request(
            image,
            rater_id=rater_id,
            plausible=plausible,
            condition=condition,
            class_name=class_name,
            prompt=prompt,
            item_id=item_id,
            criteria=criteria,
            comment=comment,
            time_spent_ms=time_spent_ms,
            generator=generator,
            client_request_id=client_request_id,
        )
        resp = await self._t.call(rw.SUBMIT_FEEDBACK, req, timeout=timeout)
        return rw.feedback_from(resp.feedback, resp.duplicate)

    async def list(
        self,
        *,
        condition: Condition = None,
        class_name: str | None = None,
        prompt: str | None = None,
        rater_id: str | None = None,
        page_size: int = 500,
        timeout: float | None = None,
    ) -> list[Feedback]:
        """Every stored judgement matching the filters, oldest first (all pages)."""
        out: list[Feedback] = []
        token = ""
        while True:
            req = rw.list_request(condition, class_name, prompt, rater_id, page_size, token)
            resp = await self._t.call(rw.LIST_FEEDBACK, req, timeout=timeout)
            out += [rw.feedback_from(f) for f in resp.feedback]
            token = resp.next_page_token
            if not token:
                return out

    async def export(
        self,
        *,
        out: str | os.PathLike[str] | None = None,
        prefix: str | None = None,
        condition: Condition = None,
        class_name: str | None = None,
        prompt: str | None = None,
        aggregate: str = "all",
        timeout: float | None = None,
    ) -> FeedbackExport:
        """Write the labelled data set in the store; with ``out``, also download it there."""
        req = rw.export_request(prefix, condition, class_name, prompt, aggregate)
        resp = await self._t.call(rw.EXPORT_FEEDBACK, req, timeout=timeout)
        writer = None
        if out is not None:
            writer = rw.ExportWriter(out)
            dl = reward_pb2.DownloadExportRequest(prefix=resp.prefix)
            async for chunk in self._t.stream(rw.DOWNLOAD_EXPORT, dl, timeout=timeout):
                writer.feed(chunk)
        return rw.export_result(resp, writer)


class AsyncReviewCalls:
    """``client.review``: the expert review queue."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def enqueue(
        self,
        images: Any,
        *,
        condition: Condition = None,
        class_name: str | None = None,
        prompt: str | None = None,
        raters_per_item: int = 1,
        generator: str | None = None,
        names: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[ReviewItem]:
        """Queue images for expert review, each to be judged by ``raters_per_item`` raters.

        ``names`` label the items for raters; by default a file's base name (never its folder).
        """
        req = rw.enqueue_request(
            images, condition, class_name, prompt, raters_per_item, generator, names
        )
        resp = await self._t.call(rw.ENQUEUE_REVIEW, req, timeout=timeout)
        return [rw.review_item(m) for m in resp.items]

    async def next(
        self,
        rater_id: str,
        *,
        condition: Condition = None,
        class_name: str | None = None,
        prompt: str | None = None,
        limit: int = 10,
        timeout: float | None = None,
    ) -> ReviewBatch:
        """Items for ``rater_id``, least certain (by the current reward model) first."""
        req = rw.next_request(rater_id, condition, class_name, prompt, limit)
        resp = await self._t.call(rw.NEXT_REVIEW_ITEMS, req, timeout=timeout)
        return ReviewBatch([rw.review_item(m) for m in resp.items], resp.pending)


class AsyncFinetune:
    """``client.finetune``: durable training jobs, checkpoints, promotion, data sets."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        kind: str,
        dataset: str,
        *,
        params: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> FinetuneJob:
        """Validate and queue a job (retries are safe: idempotent on ``request_id``)."""
        req = ft.create_request(kind, dataset, params, model_name, request_id)
        return FinetuneJob.from_proto(await self._t.call(ft.CREATE_JOB, req, timeout=timeout))

    async def get(self, job_id: str, *, timeout: float | None = None) -> FinetuneJob:
        """The job as it is now (state, step, latest metrics)."""
        req = finetune_pb2.GetJobRequest(id=job_id)
        return FinetuneJob.from_proto(await self._t.call(ft.GET_JOB, req, timeout=timeout))

    async def cancel(
        self, job_id: str, *, strict: bool = False, timeout: float | None = None
    ) -> FinetuneJob:
        """Stop a job (``strict``: fail if it already ended instead of returning it as is)."""
        req = finetune_pb2.CancelJobRequest(id=job_id, strict=strict)
        return FinetuneJob.from_proto(await self._t.call(ft.CANCEL_JOB, req, timeout=timeout))

    async def watch(
        self, job_id: str, *, since: int = 0, timeout: float | None = None
    ) -> AsyncIterator[JobEvent]:
        """Events from ``since`` until the job ends (closing the iterator cancels the call)."""
        req = finetune_pb2.WatchJobRequest(id=job_id, since_sequence=since)
        async for msg in self._t.stream(ft.WATCH_JOB, req, timeout=timeout):
            yield JobEvent.from_proto(msg)

    async def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[JobEvent], None] | bool = False,
        timeout: float | None = None,
    ) -> FinetuneJob:
        """Follow the job's events until it ends; returns the final job.

        ``progress``: a callback receiving every JobEvent, or True for a tqdm bar over the steps.
        """
        bar = progress is True
        max_steps = 0
        if bar:  # the bar's length
            job = await self.get(job_id, timeout=timeout)
            max_steps = job.max_steps
        with progress_sink(bar, desc=job_id) as update:
            async for event in self.watch(job_id, timeout=timeout):
                if callable(progress):
                    progress(event)
                if update is not None:
                    update(ft.job_progress(event, max_steps))
        return await self.get(job_id, timeout=timeout)

    async def checkpoints(self, job_id: str, *, timeout: float | None = None) -> list[Checkpoint]:
        """The job's checkpoints, oldest first (``best`` marks the one promotion picks)."""
        req = finetune_pb2.ListCheckpointsRequest(job_id=job_id)
        resp = await self._t.call(ft.LIST_CHECKPOINTS, req, timeout=timeout)
        return [Checkpoint.from_proto(c) for c in resp.checkpoints]

    async def promote(
        self,
        job_id: str,
        checkpoint: str | None = None,
        *,
        model_name: str | None = None,
        timeout: float | None = None,
    ) -> PromoteResult:
        """Checkpoint (default: the best, else the last) → a new Triton model version."""
        req = finetune_pb2.PromoteCheckpointRequest(
            job_id=job_id, checkpoint_id=checkpoint or "", model_name=model_name or ""
        )
        resp = await self._t.call(ft.PROMOTE_CHECKPOINT, req, timeout=timeout)
        return PromoteResult(ModelInfo.from_proto(resp.model), resp.previous_version)

    async def kinds(self, *, timeout: float | None = None) -> list[JobKind]:
        """The job kinds the service runs, with their parameters and data set layout."""
        req = finetune_pb2.ListJobKindsRequest()
        resp = await self._t.call(ft.LIST_JOB_KINDS, req, timeout=timeout)
        return [JobKind.from_proto(k) for k in resp.kinds]

    async def upload_file(
        self, path: str | os.PathLike[str], key: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """One file into the store at ``key`` (sha256 checked by the server)."""
        chunks = ft.upload_chunks(pathlib.Path(path), key)
        return ft.ref_dict(await self._t.call(ft.UPLOAD_DATASET_FILE, chunks, timeout=timeout))

    async def upload_dataset(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        *,
        layout: str | None = None,
        shards: bool = False,
        shard_mb: float = 64.0,
        reports_csv: str | os.PathLike[str] | None = None,
        report_key: str = "study_id",
        report_text: str = "report",
        section: str = "impression",
        class_column: str | None = None,
        progress: ProgressCallback | bool | None = False,
        timeout: float | None = None,
    ) -> DatasetReport:
        """Check a local folder against its layout, upload it under ``prefix``, validate there.

        Raises ``ValueError`` listing every local problem before anything is uploaded.
        ``progress``: a callback receiving a ProgressEvent per file, or True for a tqdm bar.
        ``shards``: write tar shards of about ``shard_mb`` MB and ``index.json`` instead of one
        object per file; resumable (shards the store already holds are skipped by name, which
        carries their digest). ``layout="dicom_archive"`` (always sharded): a DICOM tree plus
        ``reports_csv``, one row per study or image (``report_key`` column, matched to a folder
        name or file stem), whose ``report_text`` section ``section`` becomes the prompt; images
        go under their ``class_column`` value (else ``images/``).
        """
        prefix = prefix.strip("/")
        if shards or layout == "dicom_archive":
            return await self._upload_shards(
                local_dir,
                prefix,
                ft.shard_plan(
                    local_dir,
                    layout,
                    shard_bytes=int(shard_mb * 1024**2),
                    reports_csv=reports_csv,
                    report_key=report_key,
                    report_text=report_text,
                    section=section,
                    class_column=class_column,
                ),
                progress,
                timeout,
            )
        layout, files, problems = ft.check_local_dataset(local_dir, layout)
        if problems:
            raise ValueError(
                f"{local_dir} is not a valid {layout} data set:\n  " + "\n  ".join(problems)
            )
        base = pathlib.Path(local_dir)
        desc = f"uploading to {prefix}"
        with progress_sink(progress, desc=desc, unit="file", total=len(files)) as update:
            for done, path in enumerate(files, 1):
                rel = path.relative_to(base).as_posix()
                await self.upload_file(path, f"{prefix}/{rel}", timeout=timeout)
                if update is not None:
                    update(ProgressEvent("upload", done, len(files), done / len(files), rel))
        return await self.validate_dataset(prefix, layout=layout, timeout=timeout)

    async def _upload_shards(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        plan: ft.ShardPlan,
        progress: ProgressCallback | bool | None,
        timeout: float | None,
    ) -> DatasetReport:
        """Shards not yet stored, then the layout's files, then ``index.json`` (last)."""
        import tempfile

        from clinisynth import _shards

        if plan.problems:
            raise ValueError(
                f"{local_dir} is not a valid data set:\n  " + "\n  ".join(plan.problems)
            )
        if plan.left_out:
            import warnings

            shown = "\n  ".join(plan.left_out[:20])
            more = f"\n  ... and {len(plan.left_out) - 20} more" if len(plan.left_out) > 20 else ""
            warnings.warn(
                f"{len(plan.left_out)} image(s) of {local_dir} left out:\n  {shown}{more}",
                stacklevel=2,
            )
        req = finetune_pb2.ListDatasetFilesRequest(prefix=prefix)
        listed = await self._t.call(ft.LIST_DATASET_FILES, req, timeout=timeout)
        stored = {f.key[len(prefix) + 1 :]: f.sha256 for f in listed.files}
        entries: list[dict[str, Any]] = []
        total = len(plan.shards)
        with (
            tempfile.TemporaryDirectory() as tmp,
            progress_sink(progress, desc=f"uploading to {prefix}", unit="shard", total=total) as up,
        ):
            for done, shard in enumerate(plan.shards, 1):
                data = shard.bytes()
                name, digest = _shards.shard_name(shard.number, data)
                note = "already stored" if name in stored else "uploaded"
                if name not in stored:
                    path = pathlib.Path(tmp) / "shard.tar"
                    path.write_bytes(data)
                    ref = await self.upload_file(path, f"{prefix}/{name}", timeout=timeout)
                    stored[name] = ref["sha256"]
                entries.append(
                    {
                        "name": name,
                        "sha256": stored[name],
                        "source_sha256": digest,
                        "size_bytes": len(data),
                        "paths": [m.name for m in shard.members],
                        "shapes": [_shards.shape_of(m.path) for m in shard.members],
                    }
                )
                if up is not None:
                    up(ProgressEvent("upload", done, total, done / total, f"{name} {note}"))
            files = [*plan.plain, (_shards.INDEX_NAME, _shards.index_json(plan.layout, entries))]
            for rel, body in files:
                path = pathlib.Path(tmp) / "file"
                path.write_bytes(body)
                await self.upload_file(path, f"{prefix}/{rel}", timeout=timeout)
        return await self.validate_dataset(prefix, layout=plan.layout, timeout=timeout)

    async def validate_dataset(
        self, prefix: str, *, layout: str | None = None, timeout: float | None = None
    ) -> DatasetReport:
        """Check a data set already in the store against a layout (default: guessed)."""
        req = finetune_pb2.ValidateDatasetRequest(prefix=prefix, layout=layout or "")
        resp = await self._t.call(ft.VALIDATE_DATASET, req, timeout=timeout)
        return DatasetReport.from_proto(resp)

    # after every method annotated with the builtin: `list` shadows it in the class body
    async def list(
        self, *, state: str | None = None, kind: str | None = None, timeout: float | None = None
    ) -> list[FinetuneJob]:
        """Every job (newest first), optionally of one state / kind."""
        out: list[FinetuneJob] = []
        token = ""
        while True:
            req = ft.list_request(state, kind, token)
            resp = await self._t.call(ft.LIST_JOBS, req, timeout=timeout)
            out += [FinetuneJob.from_proto(j) for j in resp.jobs]
            token = resp.next_page_token
            if not token:
                return out


class AsyncClient:
    """A client of every clinisynth service. Keyword-only options; each call takes ``timeout`` (s).

    ``address``: a host running every service at its default port; ``endpoints``: explicit
    addresses per service; neither: the stack recorded by ``clinisynth up``. ``retries`` bounds
    the retries of idempotent calls on UNAVAILABLE / RESOURCE_EXHAUSTED (a server's RetryInfo
    delay is honoured). ``token``: a bearer token (a JWT or a static token); ``token_file``
    (default ``$CLINISYNTH_TOKEN_FILE`` when no token is given): a file holding it, re-read on
    every call so a rotated token is used at once. ``certificate_chain`` / ``private_key`` (PEM
    bytes; default the files ``$CLINISYNTH_CLIENT_CERT`` / ``$CLINISYNTH_CLIENT_KEY``): a client
    certificate, for servers that verify them (mTLS); implies TLS. ``Client`` blocks;
    ``AsyncClient`` is its asyncio twin (``await`` each call, ``async for`` over streams), with
    the same methods, parameters and docstrings.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        endpoints: Endpoints | dict[str, str] | None = None,
        token: str | None = None,
        token_file: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = 3,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        self._t = AsyncTransport(
            make_settings(
                address,
                endpoints,
                token,
                tls,
                root_certificates,
                timeout,
                retries,
                token_file,
                certificate_chain=certificate_chain,
                private_key=private_key,
            )
        )

    @property
    def endpoints(self) -> Endpoints:
        """The address of each service this client talks to."""
        return self._t.settings.endpoints

    @property
    def feedback(self) -> AsyncFeedbackCalls:
        """Expert judgements: submit, list, export."""
        return AsyncFeedbackCalls(self._t)

    @property
    def review(self) -> AsyncReviewCalls:
        """The expert review queue: enqueue, next."""
        return AsyncReviewCalls(self._t)

    @property
    def finetune(self) -> AsyncFinetune:
        """Training jobs, checkpoints, promotion and data sets."""
        return AsyncFinetune(self._t)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel (pending calls are cancelled)."""
        await self._t.close()

    # -- health ---------------------------------------------------------------------------------
    async def health(self, *, timeout: float | None = 5.0) -> dict[str, str]:
        """grpc.health.v1 status of every service ("SERVING", "NOT_SERVING", "UNAVAILABLE")."""
        out: dict[str, str] = {}
        for service in SERVICES:
            if not self.endpoints.for_service(service):
                continue
            check = Rpc(service, health_pb2_grpc.HealthStub, "Check")
            try:
                resp = await self._t.call(check, health_pb2.HealthCheckRequest(), timeout=timeout)
                out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except ClinisynthError as err:
                out[service] = err.code
        return out

    # -- generator ------------------------------------------------------------------------------
    async def list_models(
        self,
        kind: str | None = None,
        *,
        name: str | None = None,
        all_versions: bool = False,
        timeout: float | None = None,
    ) -> list[ModelInfo]:
        """Every model the stack serves (kind: text_to_image, class_conditional, ...)."""
        pages: list[common_pb2.ListModelsResponse] = []
        token = ""
        while True:
            req = gen.list_models_request(kind, name, all_versions, token)
            resp = await self._t.call(gen.LIST_MODELS, req, timeout=timeout)
            pages.append(resp)
            token = resp.next_page_token
            if not token:
                return gen.model_infos(pages)

    async def generate(
        self,
        model: str,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        class_name: str | None = None,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        eta: float = 0.0,
        format: str = "png",
        store: bool = False,
        output_prefix: str | None = None,
        min_reward: float | None = None,
        best_of_n: int | None = None,
        reward_model: str | None = None,
        preview_every: int = 0,
        modality: str | None = None,
        request_id: str | None = None,
        to_pacs: str | None = None,
        memorization: str | None = None,
        progress: ProgressCallback | bool | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        """Generate images. ``model`` is ``"name"`` or ``"name@version"``.

        ``format``: "png", "png16", "dicom" or "raw"; ``store``: also write them to the store;
        ``min_reward`` / ``best_of_n`` / ``reward_model``: keep only well-scored candidates.
        ``to_pacs``: a configured PACS destination the images also go to as one DICOM series
        (queued durably before the reply; ``result.pacs`` / :meth:`pacs_outbox` show delivery).
        ``memorization``: "off", "flag", "regenerate" (the server's default) or "refuse" — what
        happens to an image that is a near-copy of a training image (each image's
        ``memorization`` / ``memorization_distance`` say what the gate found).
        A call with a ``seed`` is retried on UNAVAILABLE (it gives the same images).
        ``progress``: a callback receiving ProgressEvents (or True for a tqdm bar); uses the
        streaming RPC.
        """
        req = gen.generate_request(
            model,
            prompt=prompt,
            negative_prompt=negative_prompt,
            class_name=class_name,
            n=n,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            seed=seed,
            eta=eta,
            format=format,
            store=store,
            output_prefix=output_prefix,
            min_reward=min_reward,
            best_of_n=best_of_n,
            reward_model=reward_model,
            preview_every=preview_every,
            modality=modality,
            request_id=request_id,
            to_pacs=to_pacs,
            memorization=memorization,
        )
        if not progress:
            return gen.generation_result(await self._t.call(gen.GENERATE, req, timeout=timeout))
        with progress_sink(progress, desc="generating") as update:
            assembler = gen.StreamAssembler(update)
            async for event in self._t.stream(gen.GENERATE_STREAM, req, timeout=timeout):
                assembler.feed(event)
            return assembler.finish()

    async def pacs_outbox(
        self,
        *,
        status: str | None = None,
        destination: str | None = None,
        limit: int = 100,
        timeout: float | None = None,
    ) -> list[PacsItem]:
        """The PACS outbox: each instance ``"pending"``, ``"delivered"`` or ``"failed"``."""
        req = gen.pacs_outbox_request(status, destination, limit)
        return gen.pacs_items(await self._t.call(gen.LIST_PACS_OUTBOX, req, timeout=timeout))

    # -- reward ---------------------------------------------------------------------------------
    async def score(
        self,
        images: Any,
        condition: Condition = None,
        *,
        class_name: str | None = None,
        prompt: str | None = None,
        model: str | None = None,
        resize: bool = False,
        generator: str | None = None,
        domain_guard: str | None = None,
        progress: ProgressCallback | bool | None = None,
        timeout: float | None = None,
    ) -> list[ImageScore]:
        """Reward (= P(aligned)) per image. ``condition``: a class name (or use ``prompt=``).

        ``images``: paths, bytes, PIL images, arrays, or a numpy batch; sent in chunks of 64.
        ``model``: "name" or "name@version" (default: the service's default for the condition).
        ``domain_guard``: "refuse" (default: an image far outside the model's training images
        fails with FAILED_PRECONDITION) or "warn" (scored; ``ImageScore.domain`` flags it).
        ``progress``: a callback receiving a ProgressEvent per chunk, or True for a tqdm bar.
        """
        items = rw.image_list(images)
        reqs = rw.score_requests(
            items, condition, class_name, prompt, model, resize, generator, domain_guard
        )
        out: list[ImageScore] = []
        with progress_sink(progress, desc="scoring", unit="img", total=len(items)) as update:
            for start, req in reqs:
                resp = await self._t.call(rw.SCORE, req, timeout=timeout)
                out += rw._with_names(resp, items, start)
                if update is not None:
                    update(ProgressEvent("score", len(out), len(items), len(out) / len(items)))
        return out

    def score_stream(
        self,
        images: Iterable[Any] = (),
        condition: Condition = None,
        *,
        class_name: str | None = None,
        prompt: str | None = None,
        model: str | None = None,
        resize: bool = False,
        store_prefix: str | None = None,
        batch_size: int = 0,
        generator: str | None = None,
        domain_guard: str | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> AsyncScoreStream:
        """Score a large set lazily: items are images or ``(name, image[, condition])``; or
        every image under ``store_prefix``. Iterate the result; ``.summary`` at the end."""
        reqs = rw.stream_requests(
            images if not store_prefix else (),
            condition=rw.condition_msg(condition, class_name=class_name, prompt=prompt),
            model=model,
            resize=resize,
            store_prefix=store_prefix,
            batch_size=batch_size,
            generator=generator,
            domain_guard=domain_guard,
        )
        return AsyncScoreStream(self._t.stream(rw.SCORE_STREAM, reqs, timeout=timeout), progress)

    async def score_folder(
        self,
        folder: str | os.PathLike[str],
        *,
        model: str | None = None,
        class_name: str | None = None,
        prompt: str | None = None,
        resize: bool = False,
        batch_size: int = 64,
        domain_guard: str | None = None,
        progress: ProgressCallback | bool | None = True,
        timeout: float | None = None,
    ) -> list[ImageScore]:
        """Every image under ``folder`` (sub-folder = class unless a class / prompt is given);
        ``name`` is the path relative to ``folder``."""
        files = rw.folder_images(folder, class_name, prompt)
        if not files:
            raise ValueError(f"no images under {folder}")
        with progress_sink(progress, desc="scoring", unit="img", total=len(files)) as update:
            stream = self.score_stream(
                ((rel, path, cond) if cond else (rel, path) for rel, path, cond in files),
                class_name=class_name,
                prompt=prompt,
                model=model,
                resize=resize,
                batch_size=batch_size,
                domain_guard=domain_guard,
                progress=update,
                timeout=timeout,
            )
            return [score async for score in stream]

    async def checklist(
        self,
        condition: Condition = None,
        *,
        class_name: str | None = None,
        prompt: str | None = None,
        timeout: float | None = None,
    ) -> list[Criterion]:
        """The criteria experts are asked about for a condition (or the general ones)."""
        req = rw.checklist_request(condition, class_name, prompt)
        resp = await self._t.call(rw.GET_CHECKLIST, req, timeout=timeout)
        return [Criterion(c.name, c.description) for c in resp.criteria]

    async def agreement(
        self,
        condition: Condition = None,
        *,
        class_name: str | None = None,
        prompt: str | None = None,
        timeout: float | None = None,
    ) -> Agreement:
        """Inter-rater agreement per condition (Cohen / Fleiss kappa) and rater statistics."""
        req = rw.agreement_request(condition, class_name, prompt)
        return rw.agreement_from(await self._t.call(rw.GET_AGREEMENT, req, timeout=timeout))

    # -- counterfactual -------------------------------------------------------------------------
    async def counterfactual(
        self,
        image: ImageLike,
        *,
        target: str,
        diffusion_model: str | None = None,
        robust_classifier: str | None = None,
        plain_classifier: str | None = None,
        start_depth: float | None = None,
        steps: int | None = None,
        lambda_c: float | None = None,
        cone_angle_deg: float | None = None,
        distance: str | None = None,
        lambda_d: float | None = None,
        seed: int | None = None,
        mode: str | None = None,
        resize: bool = False,
        format: str = "png",
        store: bool = False,
        request_id: str | None = None,
        to_pacs: str | None = None,
        domain_guard: str | None = None,
        on_step: PointCallback | None = None,
        progress: ProgressCallback | bool | None = None,
        timeout: float | None = None,
    ) -> CounterfactualResult:
        """How would ``image`` look as class ``target``? (path, bytes, PNG/DICOM, PIL, array).

        Knobs (None = published default): diffusion_model, robust_classifier, plain_classifier
        ("name" or "name@version"), start_depth (0.5), steps (200), lambda_c (0.1),
        cone_angle_deg (30), distance ("l2" | "l1"), lambda_d (0.5 | 0.15), seed,
        mode ("cone" | "robust_only" | "plain_only"). ``on_step`` (trajectory points) or
        ``progress`` (callback, or True for a tqdm bar) use the streaming RPC; closing early
        cancels the work on the server. ``to_pacs``: also send the counterfactual as DICOM to
        this configured PACS destination (see :meth:`generate`). ``domain_guard``: "refuse"
        (default: an input far outside the diffusion model's training images fails with
        FAILED_PRECONDITION) or "warn" (edited; ``CounterfactualResult.domain`` flags it).
        """
        req = cf.counterfactual_request(
            image,
            target=target,
            diffusion_model=diffusion_model,
            robust_classifier=robust_classifier,
            plain_classifier=plain_classifier,
            start_depth=start_depth,
            steps=steps,
            lambda_c=lambda_c,
            cone_angle_deg=cone_angle_deg,
            distance=distance,
            lambda_d=lambda_d,
            seed=seed,
            mode=mode,
            resize=resize,
            format=format,
            store=store,
            request_id=request_id,
            to_pacs=to_pacs,
            domain_guard=domain_guard,
        )
        if on_step is None and not progress:
            return cf.counterfactual_result(await self._t.call(cf.CREATE, req, timeout=timeout))
        with progress_sink(progress, desc="counterfactual") as update:
            folder = cf._StreamFolder(on_step, update)
            async for event in self._t.stream(cf.STREAM, req, timeout=timeout):
                folder.feed(event)
            return folder.finish()

    def counterfactual_stream(
        self,
        image: ImageLike,
        *,
        target: str,
        diffusion_model: str | None = None,
        robust_classifier: str | None = None,
        plain_classifier: str | None = None,
        start_depth: float | None = None,
        steps: int | None = None,
        lambda_c: float | None = None,
        cone_angle_deg: float | None = None,
        distance: str | None = None,
        lambda_d: float | None = None,
        seed: int | None = None,
        mode: str | None = None,
        resize: bool = False,
        format: str = "png",
        store: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[counterfactual_pb2.CounterfactualEvent]:
        """The raw event stream (points, progress, done); closing it cancels the server work."""
        req = cf.counterfactual_request(
            image,
            target=target,
            diffusion_model=diffusion_model,
            robust_classifier=robust_classifier,
            plain_classifier=plain_classifier,
            start_depth=start_depth,
            steps=steps,
            lambda_c=lambda_c,
            cone_angle_deg=cone_angle_deg,
            distance=distance,
            lambda_d=lambda_d,
            seed=seed,
            mode=mode,
            resize=resize,
            format=format,
            store=store,
            request_id=request_id,
        )
        return self._t.stream(cf.STREAM, req, timeout=timeout)

    async def counterfactual_batch(
        self,
        input_prefix: str,
        *,
        target: str,
        output_prefix: str | None = None,
        limit: int = 0,
        diffusion_model: str | None = None,
        robust_classifier: str | None = None,
        plain_classifier: str | None = None,
        start_depth: float | None = None,
        steps: int | None = None,
        lambda_c: float | None = None,
        cone_angle_deg: float | None = None,
        distance: str | None = None,
        lambda_d: float | None = None,
        seed: int | None = None,
        mode: str | None = None,
        resize: bool = False,
        format: str = "png",
        store: bool = False,
        request_id: str | None = None,
        domain_guard: str | None = None,
        on_item: ItemCallback | None = None,
        progress: ProgressCallback | bool | None = None,
        timeout: float | None = None,
    ) -> CounterfactualBatchResult:
        """Counterfactuals of every image under a store prefix; results go to the store.

        The knobs are those of ``counterfactual``; ``on_item`` receives each finished item (an
        out-of-domain image under ``domain_guard="refuse"`` is an item with its ``error``).
        """
        options = cf.counterfactual_request(
            None,
            target=target,
            diffusion_model=diffusion_model,
            robust_classifier=robust_classifier,
            plain_classifier=plain_classifier,
            start_depth=start_depth,
            steps=steps,
            lambda_c=lambda_c,
            cone_angle_deg=cone_angle_deg,
            distance=distance,
            lambda_d=lambda_d,
            seed=seed,
            mode=mode,
            resize=resize,
            format=format,
            store=store,
            request_id=request_id,
            domain_guard=domain_guard,
        )
        req = cf.batch_request(
            input_prefix, output_prefix=output_prefix, limit=limit, options=options
        )
        with progress_sink(progress, desc="counterfactual batch") as update:
            folder = cf._BatchFolder(on_item, update)
            async for event in self._t.stream(cf.BATCH, req, timeout=timeout):
                folder.feed(event)
            return folder.finish()

    async def counterfactual_models(
        self, kind: str | None = None, *, timeout: float | None = None
    ) -> list[ModelInfo]:
        """Denoisers and classifiers the counterfactual service can use."""
        pages: list[common_pb2.ListModelsResponse] = []
        token = ""
        while True:
            req = gen.list_models_request(kind, None, False, token)
            resp = await self._t.call(cf.LIST_MODELS, req, timeout=timeout)
            pages.append(resp)
            token = resp.next_page_token
            if not token:
                return gen.model_infos(pages)

    # -- model management (finetune service) ----------------------------------------------------
    async def import_model(
        self,
        path_or_prefix: str | os.PathLike[str],
        *,
        name: str,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        instances: int | None = None,
        max_batch_size: int | None = None,
        base: str | None = None,
        component_dtypes: Mapping[str, str] | None = None,
        component_devices: Mapping[str, str] | None = None,
        replay: str | None = None,
        layout: str | None = None,
        progress: ProgressCallback | bool | None = False,
        timeout: float | None = md.IMPORT_TIMEOUT,
    ) -> ModelDetails:
        """Serve a checkpoint folder as the next version of ``name``; returns the new version.

        ``path_or_prefix``: a local folder (a StableDiffusionPipeline, DDPM / DDIM or UNet2DModel
        folder, a clinisynth classifier / reward folder), uploaded in chunks first and resumable
        (files the server holds with the same sha256 are skipped), or a store prefix already
        holding one. ``dtype`` float32 | float16 | bfloat16, ``device`` cpu | gpu, ``instances``
        and ``max_batch_size`` go to each component's Triton config. Every problem of the folder
        is an InvalidArgumentError naming the field (``source.tokenizer``, ...).
        ``component_dtypes`` / ``component_devices``: per component, keyed by the folder's
        names ``unet``, ``text_encoder``, ``vae`` (e.g. ``{"vae": "float32"}``); the others
        take ``dtype`` / ``device``. Under ``dtype="float16"`` the VAE stays float32 unless
        named (the SD-1.x VAE overflows in float16); a float16 VAE is decoded once at import
        and refused (``component_dtypes[vae]``) when its output is not finite.
        ``replay``: "exact" (default: bit-identical pixels whatever Triton batches with a
        request) or "batched" (rows share forward passes: more throughput, a re-run equal up
        to float rounding); provenance's ``replay`` says which.
        ``layout``: "split" (default: one Triton model, so one process per instance, per
        component) or "packed" (one process per instance holding every component: less host
        memory, no parallelism between components, all on one device); same pixels either way.
        ``base``: ``NAME@VERSION`` (or an alias) when the folder is a LoRA adapter
        (``pytorch_lora_weights.safetensors``): it is merged into that version's weights and
        served as the new version; a module that does not fit the base is named
        (``source.lora.unet.<module>``).
        ``progress``: a callback receiving a ProgressEvent per uploaded file (stage "upload"),
        then one per import stage as the server runs it ("fetch", "merge", "validate", "write"
        and "load" per component, "record"), or True for tqdm bars.
        """
        source = os.fspath(path_or_prefix)
        if pathlib.Path(source).is_dir():
            source = await self._upload_model_folder(pathlib.Path(source), progress, timeout)
        req = md.import_request(
            source,
            name,
            description,
            labels,
            dtype,
            device,
            instances,
            max_batch_size,
            base,
            component_dtypes,
            component_devices,
            replay,
            layout,
        )
        if not progress:
            reply = await self._t.call(md.IMPORT_MODEL, req, timeout=timeout)
            return ModelDetails.from_proto(reply)
        with progress_sink(progress, desc=f"importing {name}", unit="stage") as update:
            async for event in self._t.stream(md.IMPORT_MODEL_STREAM, req, timeout=timeout):
                details = md.import_event(event, update)
                if details is not None:
                    return details
        raise RuntimeError("the import stream ended without the imported version")

    async def _upload_model_folder(
        self,
        root: pathlib.Path,
        progress: ProgressCallback | bool | None,
        timeout: float | None,
    ) -> str:
        """Upload what the server lacks of ``root``; returns its ``imports/<id>`` prefix."""
        manifest = md.folder_manifest(root)
        prefix = md.IMPORTS + md.upload_id(manifest)
        listed = await self._t.call(
            md.LIST_MODEL_UPLOAD,
            finetune_pb2.ListModelUploadRequest(upload_id=prefix[len(md.IMPORTS) :]),
            timeout=timeout,
        )
        held = {f.key[len(prefix) + 1 :]: f.sha256 for f in listed.files}
        total = len(manifest)
        with progress_sink(progress, desc=f"uploading {root.name}", unit="file", total=total) as up:
            for done, (rel, (path, digest)) in enumerate(sorted(manifest.items()), 1):
                skipped = held.get(rel) == digest
                if not skipped:
                    chunks = ft.upload_chunks(path, f"{prefix}/{rel}")
                    await self._t.call(md.UPLOAD_MODEL_FILE, chunks, timeout=timeout)
                if up is not None:
                    note = f"{rel} (already uploaded)" if skipped else rel
                    up(ProgressEvent("upload", done, total, done / total, note))
        return prefix

    async def get_model(self, model: str, *, timeout: float | None = None) -> ModelDetails:
        """``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS`` in full: components, Triton readiness,
        dtype, device, size, defaults; retired versions too (their images' provenance)."""
        req = md.ref_request(model)
        return ModelDetails.from_proto(await self._t.call(md.GET_MODEL, req, timeout=timeout))

    async def delete_model(self, model: str, *, timeout: float | None = None) -> ModelDetails:
        """Retire ``NAME@VERSION``: unloaded from Triton, no longer listed nor served; its record
        stays so images citing it keep resolvable provenance."""
        req = md.delete_request(model)
        return ModelDetails.from_proto(await self._t.call(md.DELETE_MODEL, req, timeout=timeout))

    async def alias_model(
        self, model: str, alias: str, *, timeout: float | None = None
    ) -> ModelDetails:
        """Point ``alias`` at ``NAME@VERSION``; ``generate("NAME@ALIAS")`` then resolves it."""
        req = md.alias_request(model, alias)
        return ModelDetails.from_proto(await self._t.call(md.SET_MODEL_ALIAS, req, timeout=timeout))

    # -- audit ----------------------------------------------------------------------------------
    async def audit(
        self,
        *,
        since: au.TimeLike = None,
        until: au.TimeLike = None,
        principal: str | None = None,
        method: str | None = None,
        limit: int | None = None,
        page_size: int = 500,
        timeout: float | None = None,
    ) -> list[AuditEntry]:
        """The audit trail, oldest first (admins only): one entry per call to any service.

        ``since`` / ``until``: a datetime, Unix seconds, an ISO-8601 string or a span back from
        now ("15m", "2h", "7d"); calls started in [since, until). ``principal``: one caller's
        name; ``method``: a full RPC name or its short name ("SubmitFeedback"). ``limit``: at
        most this many entries (the oldest); default every page.
        """
        start = au.to_seconds(since, "since")
        end = au.to_seconds(until, "until")
        rpc = au.list_rpc(self.endpoints)
        out: list[AuditEntry] = []
        token = ""
        while True:
            size = page_size if limit is None else max(1, min(page_size, limit - len(out)))
            req = au.list_request(start, end, principal, method, size, token)
            resp = await self._t.call(rpc, req, timeout=timeout)
            out += [au.entry_from(r) for r in resp.records]
            token = resp.next_page_token
            if not token or (limit is not None and len(out) >= limit):
                return out if limit is None else out[:limit]
