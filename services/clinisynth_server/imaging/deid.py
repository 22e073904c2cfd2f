"""De-identify DICOM input before anything is stored, and describe datasets safely in logs.

:func:`deidentify` follows the spirit of the DICOM Basic Application Level Confidentiality
Profile (PS3.15 Annex E) with two options, recorded in DeidentificationMethodCodeSequence:

* patient / physician / institution / device identifiers and free-text descriptions are removed
  (type-2 attributes such as PatientName are kept but emptied, so the object stays valid);
* every person name (PN) anywhere, including inside sequences, is emptied;
* private tags, overlays (60xx), curves (50xx), digital signatures (FFFA), trailing padding
  (FFFC), application entity titles (AE) and attributes no DICOM dictionary knows (they cannot
  be judged, so they are not kept) are removed, in the data set and in the file meta;
* dates (DA / DT) are shifted by a whole number of days (Retain Longitudinal Temporal Information
  with Modified Dates), or emptied when no shift is given; times of day are kept only when dates
  are shifted;
* instance UIDs (every UI value that is not a registered DICOM UID such as a SOP Class or
  transfer syntax) are replaced by ``2.25.`` UIDs hashed with a salt, so references between the
  objects of one study stay consistent when the same salt is used;
* PatientIdentityRemoved = YES, DeidentificationMethod and its code sequence are set.

Pixel data is not inspected: an object with BurnedInAnnotation YES is refused. Pixels and the
attributes that say how to show them (WindowCenter / Width, RescaleSlope / Intercept,
PhotometricInterpretation, BitsStored, ...) are kept unchanged.

:func:`deidentify_input` is the one entry point the services call on every image a client
sends: DICOM is de-identified (UIDs salted with the object's own digest, so the same upload
gives the same bytes and content addressing still deduplicates), anything else passes as is.
"""

from __future__ import annotations

import copy
import hashlib
import io
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging.decode import describe_error, read_dicom

#: Attributes removed outright (basic profile "X" actions and identifying free text).
REMOVED_ATTRIBUTES: tuple[str, ...] = (
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientSize",
    "PatientWeight",
    "PatientReligiousPreference",
    "PatientComments",
    "PatientInsurancePlanCodeSequence",
    "PatientPrimaryLanguageCodeSequence",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "MedicalAlerts",
    "Allergies",
    "CountryOfResidence",
    "RegionOfResidence",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingPhysician",
    "RequestingService",
    "OperatorsName",
    "OperatorIdentificationSequence",
    "StationName",
    "DeviceSerialNumber",
    "PlateID",
    "DetectorID",
    "CassetteID",
    "GantryID",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
    "ScheduledProcedureStepDescription",
    "RequestAttributesSequence",
    "AdmittingDiagnosesDescription",
    "AdmissionID",
    "IssuerOfAdmissionID",
    "DerivationDescription",
    "ImageComments",
    "FrameComments",
    "TextComments",
    "TextString",
    "AcquisitionComments",
    "InterpretationText",
    "ReasonForStudy",
    "StudyComments",
    "CurrentPatientLocation",
    "PatientInstitutionResidence",
    "VisitComments",
    "ContentCreatorName",
    "ReferencedPatientSequence",
    "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence",
    "IssuerOfPatientID",
    "ClinicalTrialSponsorName",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # PS3.15 Table E.1-1, further X / D / Z attributes: free text, locations, equipment and
    # person identifiers, signatures, icons, original / modified attribute copies.
    "AcquisitionContextSequence",
    "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription",
    "ActualHumanPerformersSequence",
    "AdmittingDiagnosesCodeSequence",
    "AuthorObserverSequence",
    "CommentsOnThePerformedProcedureStep",
    "ConfidentialityConstraintOnPatientDataDescription",
    "ContentCreatorIdentificationCodeSequence",
    "ContentSequence",
    "ContributionDescription",
    "CustodialOrganizationSequence",
    "DataSetTrailingPadding",
    "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription",
    "GeneratorID",
    "GraphicAnnotationSequence",
    "HumanPerformerOrganization",
    "IconImageSequence",
    "IdentifyingComments",
    "ImagePresentationComments",
    "ImagingServiceRequestComments",
    "Impressions",
    "InstitutionalDepartmentTypeCodeSequence",
    "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence",
    "IssuerOfServiceEpisodeID",
    "MAC",
    "ModifiedAttributesSequence",
    "ModifiedImageDescription",
    "OriginalAttributesSequence",
    "OrderCallbackPhoneNumber",
    "OrderCallbackTelecomInformation",
    "OrderEntererLocation",
    "ParticipantSequence",
    "PatientPrimaryLanguageModifierCodeSequence",
    "PatientSexNeutered",
    "PatientTelecomInformation",
    "PatientState",
    "PatientTransportArrangements",
    "PerformedLocation",
    "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName",
    "PerformedStationNameCodeSequence",
    "PersonAddress",
    "PersonIdentificationCodeSequence",
    "PersonTelephoneNumbers",
    "PersonTelecomInformation",
    "PreMedication",
    "PregnancyStatus",
    "ReasonForTheImagingServiceRequest",
    "ReasonForTheRequestedProcedure",
    "ReferencedDigitalSignatureSequence",
    "ReferencedPatientAliasSequence",
    "ReferencedPatientPhotoSequence",
    "ReferencedSOPInstanceMACSequence",
    "RequestedProcedureComments",
    "RequestedProcedureLocation",
    "RequestingPhysicianIdentificationSequence",
    "ResultsComments",
    "ResultsDistributionListSequence",
    "ResultsIDIssuer",
    "ScheduledHumanPerformersSequence",
    "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence",
    "ScheduledProcedureStepLocation",
    "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName",
    "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle",
    "ServiceEpisodeDescription",
    "ServiceEpisodeID",
    "SpecialNeeds",
    "StorageMediaFileSetID",
    "StudyIDIssuer",
    "TimezoneOffsetFromUTC",
    "TopicAuthor",
    "TopicKeywords",
    "TopicSubject",
    "TopicTitle",
    "VerifyingObserverIdentificationCodeSequence",
    "VerifyingObserverSequence",
    "VerifyingOrganization",
    "ConsultingPhysicianIdentificationSequence",
    "StationAETitle",
    "DeviceDescription",
    "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence",
    "BreedRegistrationNumber",
    "InterpretationDiagnosisDescription",
    "InterpretationID",
    "InterpretationIDIssuer",
    "InterpretationApproverSequence",
    "InterpretationTranscriber",
    "InterpretationRecorder",
    "InterpretationAuthor",
    "DistributionAddress",
    "DistributionName",
    "RequestedContrastAgent",
    "RetrieveAETitle",
    "AcquisitionProtocolName",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
)

#: Type-2 attributes kept but emptied (basic profile "Z"), so the object still validates.
EMPTIED_ATTRIBUTES: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)

#: Every attribute :func:`deidentify` guarantees absent or empty afterwards (tests check this).
IDENTIFYING_ATTRIBUTES: tuple[str, ...] = EMPTIED_ATTRIBUTES + REMOVED_ATTRIBUTES

#: Groups removed whole: curves, overlays, digital signatures, data set trailing padding.
_REMOVED_GROUPS = ((0x5000, 0x50FF), (0x6000, 0x60FF), (0xFFFA, 0xFFFA), (0xFFFC, 0xFFFC))

#: File meta attributes that name a sender or carry free-form private information.
_REMOVED_META = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)

#: DeidentificationMethod is LO: at most 64 characters.
_DEID_METHOD = "clinisynth deid 1: basic profile, private tags removed"


def _new_uid(old: str, salt: str) -> str:
    """A ``2.25.`` UID derived from (salt, old UID): stable for one salt, unlinkable without.

    The 128-bit hash is shaped as a UUID (PS3.5 B.2), as the ``2.25`` root requires.
    """
    digest = hashlib.sha256(f"{salt}\x00{old}".encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def _is_registered_uid(value: str) -> bool:
    """True for UIDs in the DICOM registry (SOP classes, transfer syntaxes, coding schemes)."""
    uid = UID(value)
    return uid.name != str(uid) or uid.is_transfer_syntax


def _shift_da(value: str, days: int) -> str:
    moment = datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    return (moment + timedelta(days=days)).strftime("%Y%m%d")


def _shift_dt(value: str, days: int) -> str:
    text = value.strip()
    if len(text) < 8:
        return ""
    shifted = _shift_da(text[:8], days)
    return shifted + text[8:]


def _clean(
    ds: Dataset, *, salt: str, date_shift_days: int | None, remove_set: frozenset[str]
) -> None:
    """One recursive pass over a dataset: private, overlay, PN, dates, UIDs, listed keywords."""
    for tag in list(ds.keys()):  # decide on the tag first: removed elements are never parsed
        group = tag.group
        if (
            tag.is_private
            or any(low <= group <= high for low, high in _REMOVED_GROUPS)
            or tag.element == 0  # group lengths: stale once anything is removed
            or not dictionary_has_tag(tag)
        ):
            del ds[tag]
            continue
        elem = ds[tag]
        keyword = elem.keyword
        if keyword in remove_set or elem.VR == "AE":
            del ds[tag]
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                _clean(item, salt=salt, date_shift_days=date_shift_days, remove_set=remove_set)
            continue
        if elem.value is None or elem.value == "":
            continue
        if elem.VR == "PN":
            elem.value = ""
        elif elem.VR in ("DA", "DT"):
            shift = _shift_da if elem.VR == "DA" else _shift_dt
            if date_shift_days is None:
                elem.value = ""
            else:
                try:
                    if elem.VM > 1:
                        elem.value = [shift(str(v), date_shift_days) for v in elem.value]
                    else:
                        elem.value = shift(str(elem.value), date_shift_days)
                except ValueError:
                    elem.value = ""  # unparseable date: remove rather than leak
        elif elem.VR == "TM" and date_shift_days is None:
            elem.value = ""
        elif elem.VR == "UI":
            if elem.VM > 1:
                elem.value = [
                    v if _is_registered_uid(str(v)) else _new_uid(str(v), salt) for v in elem.value
                ]
            elif not _is_registered_uid(str(elem.value)):
                elem.value = _new_uid(str(elem.value), salt)


def deidentify(
    ds: Dataset,
    *,
    date_shift_days: int | None = None,
    uid_salt: str | None = None,
    pseudonym: str | None = None,
    field: str = "dicom",
) -> Dataset:
    """A de-identified deep copy of ``ds`` (the input is not modified); see the module doc.

    ``date_shift_days``: shift every date by this many days (keep times); None empties dates
    and times. ``uid_salt``: pass the same secret for every object of one study to keep their
    cross-references; None uses a fresh random salt. ``pseudonym`` becomes PatientName and
    PatientID (empty otherwise). ``field`` names the request field in errors.
    """
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise InvalidArgument.for_field(
            field,
            "BurnedInAnnotation is YES: the pixels may show identifying text, which this "
            "service cannot remove; send an image without burned-in annotation",
        )
    out = copy.deepcopy(ds)
    salt = uid_salt if uid_salt is not None else secrets.token_hex(16)
    _clean(
        out,
        salt=salt,
        date_shift_days=date_shift_days,
        remove_set=frozenset(REMOVED_ATTRIBUTES),
    )
    for keyword in EMPTIED_ATTRIBUTES:
        element = out.data_element(keyword) if keyword in out else None
        if element is not None:
            element.value = ""
    if pseudonym is not None:
        out.PatientName = pseudonym[:64]
        out.PatientID = pseudonym[:64]
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for keyword in _REMOVED_META:
            if keyword in meta:
                del meta[keyword]
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    mark_deidentified(out, dates_shifted=date_shift_days is not None)
    return out


def mark_deidentified(ds: Dataset, *, dates_shifted: bool = False) -> Dataset:
    """Set PatientIdentityRemoved = YES and the method attributes on ``ds`` (in place).

    Also used on objects derived from a de-identified input (a counterfactual of a patient
    image), which carry no identifying attribute but are still derived patient data.
    """
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _DEID_METHOD
    codes = [_code("113100", "Basic Application Confidentiality Profile")]
    if dates_shifted:
        codes.append(
            _code("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
        )
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
    ds.DeidentificationMethodCodeSequence = DicomSequence(codes)
    return ds


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def deidentify_bytes(
    data: bytes,
    *,
    date_shift_days: int | None = None,
    uid_salt: str | None = None,
    pseudonym: str | None = None,
    field: str = "dicom",
) -> bytes:
    """:func:`deidentify` on DICOM Part 10 bytes, returning Part 10 bytes (same syntax).

    Any failure to read, clean or re-encode the client's bytes (truncated file, unknown VR,
    a value its VR cannot hold) is INVALID_ARGUMENT on ``field``, never an internal error.
    """
    try:  # bounded: a deflated body never inflates past what its header declares
        ds = read_dicom(data, field=field)
    except InvalidArgument:
        raise
    except InvalidDicomError as exc:
        raise InvalidArgument.for_field(field, f"not a DICOM Part 10 file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on hostile bytes
        raise InvalidArgument.for_field(field, f"malformed DICOM: {_reason(exc)}") from exc
    try:
        clean = deidentify(
            ds,
            date_shift_days=date_shift_days,
            uid_salt=uid_salt,
            pseudonym=pseudonym,
            field=field,
        )
        out = io.BytesIO()
        clean.save_as(out, enforce_file_format=True)
    except InvalidArgument:
        raise
    except Exception as exc:  # elements are parsed lazily: bad ones surface here
        raise InvalidArgument.for_field(
            field, f"malformed DICOM, cannot be de-identified: {_reason(exc)}"
        ) from exc
    return out.getvalue()


def deidentify_input(data: bytes, *, field: str) -> bytes:
    """Client image bytes as they may be kept: DICOM de-identified, PNG / JPEG unchanged.

    The UID salt is the digest of the bytes sent, so a retried upload yields identical output
    (content-addressed keys and review items stay stable) while the new UIDs cannot be linked
    to the originals without the original object. Dates are emptied, not shifted.
    """
    if not (len(data) >= 132 and data[128:132] == b"DICM"):
        return data
    salt = hashlib.sha256(data).hexdigest()
    return deidentify_bytes(data, uid_salt=salt, field=field)


def _reason(exc: BaseException) -> str:
    """An exception as a short reason (type, first 200 characters, tags named)."""
    return describe_error(exc)


def date_shift_for(key: str, *, secret: str, max_days: int = 3650) -> int:
    """A deterministic backwards shift in ``[1, max_days]`` days for a key (e.g. a patient)."""
    digest = hashlib.sha256(f"{secret}\x00{key}".encode()).digest()
    return -(1 + int.from_bytes(digest[:8], "big") % max_days)


# --------------------------------------------------------------------------------------------
# Safe logging
# --------------------------------------------------------------------------------------------

#: The only attributes a log line may show: technical, never identifying.
_SAFE_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "BurnedInAnnotation",
    "PatientIdentityRemoved",
)


def safe_log_repr(obj: Any) -> str:
    """A one-line description for logs that never includes pixels or identifying attributes.

    Accepts a pydicom Dataset, bytes (sniffed; DICOM headers are parsed without pixels), a numpy
    array (shape / dtype / finite range only) or anything else (type name only). The SOP class
    is shown by its registered name; no instance UIDs, names, dates or free text are shown.
    Never raises: whatever goes wrong describing a hostile object, the line degrades to its
    type and length, so logging can never fail a request.
    """
    try:
        return _safe_log_repr(obj)
    except Exception:
        try:
            size = f", len={len(obj)}"
        except Exception:
            size = ""
        return f"<{type(obj).__name__}{size}, undescribable>"


def _safe_log_repr(obj: Any) -> str:
    if isinstance(obj, Dataset):
        return _dataset_repr(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        if len(data) >= 132 and data[128:132] == b"DICM":
            try:
                ds = read_dicom(data, field="log", stop_before_pixels=True)
                described = _dataset_repr(ds)
            except Exception:
                return f"bytes(len={len(data)}, kind=dicom, unreadable)"
            return f"bytes(len={len(data)}, kind=dicom, {described})"
        kind = (
            "png"
            if data.startswith(b"\x89PNG")
            else "jpeg"
            if data.startswith(b"\xff\xd8\xff")
            else "unknown"
        )
        return f"bytes(len={len(data)}, kind={kind})"
    if isinstance(obj, np.ndarray):
        desc = f"array(shape={list(obj.shape)}, dtype={obj.dtype}"
        if obj.size and obj.dtype.kind in "fiu":
            finite = np.isfinite(obj) if obj.dtype.kind == "f" else np.ones(obj.shape, bool)
            if finite.any():
                desc += f", min={float(obj[finite].min()):.4g}, max={float(obj[finite].max()):.4g}"
            desc += f", nonfinite={int((~finite).sum())}"
        return desc + ")"
    return f"<{type(obj).__name__}>"


def _dataset_repr(ds: Dataset) -> str:
    parts: list[str] = []
    sop = ds.get("SOPClassUID")
    if sop is not None:
        name = UID(str(sop)).name
        parts.append(f"sop_class={name if _is_registered_uid(str(sop)) else 'private'}")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None:
        parts.append(f"transfer_syntax={UID(str(syntax)).name}")
    for keyword in _SAFE_KEYWORDS:
        value = ds.get(keyword)
        if value is not None and value != "":
            parts.append(f"{keyword}={value}")
    parts.append(f"has_pixels={'PixelData' in ds}")
    parts.append(f"private_tags={sum(1 for e in ds if e.tag.is_private)}")
    return "DICOM(" + ", ".join(parts) + ")"


__all__ = [
    "EMPTIED_ATTRIBUTES",
    "IDENTIFYING_ATTRIBUTES",
    "REMOVED_ATTRIBUTES",
    "date_shift_for",
    "deidentify",
    "deidentify_bytes",
    "deidentify_input",
    "mark_deidentified",
    "safe_log_repr",
]
