"""A real third-party client (fhirpy, unmodified) against a running Custos server.

Run: CUSTOS_FHIR_URL=http://127.0.0.1:8080 CUSTOS_TOKEN=<bearer token> python -m pytest -q tests/clients/python
(crates/cli/tests/fhir_clients.rs starts a server, gets a SMART Backend Services
token with system/*.cruds, and does this; see .ci/run.)

Every run tags its data with a fresh random token so the scenario can run
repeatedly against the same server and still make exact assertions.
"""

import os
import random
import uuid

import pytest
import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, BaseFHIRError, OperationOutcome, ResourceNotFound

BASE_URL = os.environ.get("CUSTOS_FHIR_URL", "").rstrip("/")
TOKEN = os.environ.get("CUSTOS_TOKEN", "")
# Every FHIR request but /metadata needs a bearer token.
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ID_SYSTEM = "urn:oid:2.16.840.1.113883.4.642.99.1"
LOINC = "http://loinc.org"
HEART_RATE = "8867-4"
BODY_WEIGHT = "29463-7"

pytestmark = pytest.mark.skipif(
    not (BASE_URL and TOKEN), reason="set CUSTOS_FHIR_URL to a running Custos server and CUSTOS_TOKEN to a token"
)


@pytest.fixture(scope="module")
def client():
    return SyncFHIRClient(BASE_URL, authorization=f"Bearer {TOKEN}", requests_config={"timeout": 30})


@pytest.fixture()
def tag():
    # Letters only: used inside family names, which are string-searched.
    return "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12))


def random_birthdate():
    # A rarely used day so a birthdate search stays small.
    return f"{random.randint(1901, 1949)}-{random.randint(1, 12):02d}-{random.randint(1, 28):02d}"


def new_patient(client, tag, *, given="Ada", birth_date="1970-05-17", value=None, gender="female"):
    return client.resource(
        "Patient",
        name=[{"use": "official", "family": f"Custos{tag}", "given": [given]}],
        identifier=[{"system": ID_SYSTEM, "value": value or f"MRN-{tag}-{given}"}],
        birthDate=birth_date,
        gender=gender,
        telecom=[
            {"system": "phone", "value": "+1-555-0100", "use": "home"},
            {"system": "email", "value": f"{tag}@example.org"},
        ],
    )


def ids(resources):
    return sorted(r.id for r in resources)


def test_capability_statement(client):
    cs = client.execute("metadata", method="get")
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance"
    assert "application/fhir+json" in cs["format"] or "json" in cs["format"]
    rest = cs["rest"][0]
    assert rest["mode"] == "server"
    types = {r["type"]: r for r in rest["resource"]}
    for rtype in ("Patient", "Observation"):
        codes = {i["code"] for i in types[rtype]["interaction"]}
        assert {"read", "create", "update", "delete", "search-type"} <= codes, (rtype, codes)
    assert "transaction" in {i["code"] for i in rest.get("interaction", [])}


def test_requests_without_a_token_are_refused():
    # The CapabilityStatement is public; data is not.
    assert requests.get(f"{BASE_URL}/metadata", timeout=30).status_code == 200
    raw = requests.get(f"{BASE_URL}/Patient", timeout=30)
    assert raw.status_code == 401, (raw.status_code, raw.text)
    assert raw.headers["WWW-Authenticate"].startswith("Bearer")
    anonymous = SyncFHIRClient(BASE_URL, requests_config={"timeout": 30})
    with pytest.raises(AuthorizationError):
        anonymous.resources("Patient").fetch()
    forged = SyncFHIRClient(BASE_URL, authorization=f"Bearer {TOKEN}x", requests_config={"timeout": 30})
    with pytest.raises(AuthorizationError):
        forged.resources("Patient").fetch()


def test_patient_create_read_update_search(client, tag):
    birth_date = random_birthdate()
    patient = new_patient(client, tag, birth_date=birth_date)
    patient.save()
    assert patient.id, "create must assign an id"
    assert patient["meta"]["versionId"] == "1"
    assert patient["meta"]["lastUpdated"]

    # read (client.get and reference.to_resource)
    read = client.get("Patient", patient.id)
    assert read["resourceType"] == "Patient"
    assert read["id"] == patient.id
    assert read["name"][0]["family"] == f"Custos{tag}"
    assert read["name"][0]["given"] == ["Ada"]
    assert read["identifier"][0] == {"system": ID_SYSTEM, "value": f"MRN-{tag}-Ada"}
    assert read["birthDate"] == birth_date
    assert read["gender"] == "female"
    assert {t["system"] for t in read["telecom"]} == {"phone", "email"}
    assert read["meta"]["versionId"] == "1"
    again = client.reference("Patient", patient.id).to_resource()
    assert again.id == patient.id and again["birthDate"] == birth_date

    # update: change a field, versionId must bump
    patient["gender"] = "other"
    patient["active"] = True
    patient.save()
    assert patient["meta"]["versionId"] == "2"
    read = client.get("Patient", patient.id)
    assert read["gender"] == "other"
    assert read["active"] is True
    assert read["meta"]["versionId"] == "2"
    # the old version is still readable (vread)
    v1 = client.execute(f"Patient/{patient.id}/_history/1", method="get")
    assert v1["gender"] == "female" and v1["meta"]["versionId"] == "1"

    # refresh() sends If-None-Match with the current version; must still return the resource
    patient.refresh()
    assert patient["meta"]["versionId"] == "2"

    # a second patient in the same family, different everything else
    other = new_patient(client, tag, given="Grace", birth_date="1971-01-01", gender="male")
    other.save()

    patients = client.resources("Patient")
    # search by family (string: case-insensitive, prefix match)
    assert ids(patients.search(family=f"Custos{tag}").fetch_all()) == sorted([patient.id, other.id])
    assert ids(patients.search(family=f"custos{tag.upper()}").fetch_all()) == sorted([patient.id, other.id])
    assert {patient.id, other.id} <= set(ids(patients.search(family=f"Custos{tag[:6]}").fetch_all()))
    assert patients.search(family=f"Custos{tag}", given="Grace").fetch_all()[0].id == other.id
    # search by identifier system|value, and by bare value
    found = patients.search(identifier=f"{ID_SYSTEM}|MRN-{tag}-Ada").fetch_all()
    assert ids(found) == [patient.id]
    assert ids(patients.search(identifier=f"MRN-{tag}-Grace").fetch_all()) == [other.id]
    assert patients.search(identifier=f"urn:other|MRN-{tag}-Ada").fetch_all() == []
    # get() = exactly one match
    assert patients.search(identifier=f"{ID_SYSTEM}|MRN-{tag}-Ada").get().id == patient.id
    # search by birthdate (exact day, and prefixes)
    assert patient.id in ids(patients.search(birthdate=birth_date).fetch_all())
    assert ids(patients.search(family=f"Custos{tag}", birthdate=birth_date).fetch_all()) == [patient.id]
    assert ids(patients.search(family=f"Custos{tag}", birthdate__ge="1971-01-01").fetch_all()) == [other.id]
    assert ids(patients.search(family=f"Custos{tag}", birthdate__lt="1971-01-01").fetch_all()) == [patient.id]
    year = birth_date[:4]
    assert ids(patients.search(family=f"Custos{tag}", birthdate=year).fetch_all()) == [patient.id]
    # token search on the updated gender
    assert ids(patients.search(family=f"Custos{tag}", gender="other").fetch_all()) == [patient.id]
    # count (fhirpy sends _count=0 and reads Bundle.total)
    assert patients.search(family=f"Custos{tag}").count() == 2
    assert patients.search(identifier=f"{ID_SYSTEM}|MRN-{tag}-Ada").count() == 1
    assert patients.search(family=f"Nobody{tag}").count() == 0
    # paging: one result per page, fhirpy follows Bundle.link[next]
    assert ids(patients.search(family=f"Custos{tag}").limit(1).fetch_all()) == sorted([patient.id, other.id])
    first_page = patients.search(family=f"Custos{tag}").limit(1).fetch_raw()
    assert first_page["resourceType"] == "Bundle" and first_page["type"] == "searchset"
    assert len(first_page["entry"]) == 1
    assert first_page["total"] == 2
    assert any(link["relation"] == "next" for link in first_page["link"])
    assert first_page["entry"][0]["search"]["mode"] == "match"
    assert first_page["entry"][0]["fullUrl"].endswith(f"Patient/{first_page['entry'][0]['resource']['id']}")


def test_update_as_create_with_client_assigned_id(client, tag):
    # fhirpy sends PUT Patient/<id> when the resource already has an id
    patient = new_patient(client, tag, given="Put")
    patient["id"] = f"py-{tag}"
    patient.save()
    assert patient.id == f"py-{tag}"
    assert patient["meta"]["versionId"] == "1"
    assert client.get("Patient", f"py-{tag}")["name"][0]["given"] == ["Put"]
    patient["birthDate"] = "1999-09-09"
    patient.save()
    assert patient["meta"]["versionId"] == "2"
    history = client.execute(f"Patient/{patient.id}/_history", method="get")
    assert history["type"] == "history"
    assert sorted(e["resource"]["meta"]["versionId"] for e in history["entry"]) == ["1", "2"]


def test_search_self_link_lists_only_parameters_used(client, tag):
    # FHIR R4 search.html, "Server Conformance": the server SHALL return the parameters
    # that were actually used to process the search; for RESTful search they are encoded
    # in the Bundle's self link. An unsupported parameter ignored under lenient handling
    # (fhirpy's count() sends one: _totalMethod) must therefore not appear there.
    patient = new_patient(client, tag, given="Self")
    patient.save()
    bundle = client.resources("Patient").search(family=f"Custos{tag}", **{"x-unknown": "1"}).fetch_raw()
    assert [e["resource"].id for e in bundle["entry"] if e["search"]["mode"] == "match"] == [patient.id]
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert f"Custos{tag}" in self_link, self_link
    assert "x-unknown" not in self_link, f"self link names a parameter the server ignored: {self_link}"


def test_observation_search_by_patient_and_code(client, tag):
    patient = new_patient(client, tag)
    patient.save()
    hr = client.resource(
        "Observation",
        status="final",
        category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        code={"coding": [{"system": LOINC, "code": HEART_RATE, "display": "Heart rate"}]},
        subject=patient.to_reference(),
        effectiveDateTime="2024-03-01T10:00:00Z",
        valueQuantity={"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
    )
    hr.save()
    assert hr.id and hr["meta"]["versionId"] == "1"
    assert hr["subject"]["reference"] == f"Patient/{patient.id}"
    weight = client.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": LOINC, "code": BODY_WEIGHT}]},
        subject={"reference": f"Patient/{patient.id}"},
        effectiveDateTime="2024-03-02",
        valueQuantity={"value": 61.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
    )
    weight.save()

    obs = client.resources("Observation")
    # patient=<resource> is sent as patient=Patient/<id>
    assert ids(obs.search(patient=patient).fetch_all()) == sorted([hr.id, weight.id])
    assert ids(obs.search(patient=patient.id).fetch_all()) == sorted([hr.id, weight.id])
    assert ids(obs.search(subject=f"Patient/{patient.id}").fetch_all()) == sorted([hr.id, weight.id])
    assert ids(obs.search(patient=patient, code=f"{LOINC}|{HEART_RATE}").fetch_all()) == [hr.id]
    assert ids(obs.search(patient=patient, code=BODY_WEIGHT).fetch_all()) == [weight.id]
    assert obs.search(patient=patient, code=f"{LOINC}|0000-0").fetch_all() == []
    assert obs.search(patient=patient, code=f"{LOINC}|{HEART_RATE}").count() == 1
    assert ids(obs.search(patient=patient, date__ge="2024-03-02").fetch_all()) == [weight.id]
    # a patient without observations matches none
    lonely = new_patient(client, tag, given="Lonely")
    lonely.save()
    assert obs.search(patient=lonely).fetch_all() == []
    assert obs.search(patient=lonely).count() == 0


def test_transaction_bundle_with_urn_uuid_reference(client, tag):
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {
                    "resourceType": "Patient",
                    "name": [{"family": f"Txn{tag}", "given": ["Tess"]}],
                    "identifier": [{"system": ID_SYSTEM, "value": f"TXN-{tag}"}],
                    "birthDate": "1988-08-08",
                    "gender": "female",
                },
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": LOINC, "code": HEART_RATE}]},
                    "subject": {"reference": patient_urn},
                    "valueQuantity": {"value": 64, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    # fhirpy has no transaction helper: POST the Bundle to the base URL.
    resp = client.execute("", method="post", data=bundle)
    assert resp["resourceType"] == "Bundle"
    assert resp["type"] == "transaction-response"
    assert len(resp["entry"]) == 2
    locations = []
    for entry in resp["entry"]:
        assert entry["response"]["status"].startswith("201"), entry["response"]
        location = entry["response"]["location"]
        assert "/_history/1" in location, location
        locations.append(location)
    # location is Type/id/_history/vid, possibly absolute
    def type_id(location):
        parts = location.split("/_history/")[0].split("/")
        return parts[-2], parts[-1]

    ptype, pid = type_id(locations[0])
    otype, oid = type_id(locations[1])
    assert (ptype, otype) == ("Patient", "Observation")

    created = client.get("Patient", pid)
    assert created["name"][0]["family"] == f"Txn{tag}"
    observation = client.get("Observation", oid)
    # the urn:uuid reference was rewritten to the new Patient's id
    assert observation["subject"]["reference"] == f"Patient/{pid}"
    assert ids(client.resources("Observation").search(patient=f"Patient/{pid}").fetch_all()) == [oid]
    assert ids(client.resources("Patient").search(identifier=f"{ID_SYSTEM}|TXN-{tag}").fetch_all()) == [pid]


def test_transaction_is_atomic(client, tag):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {"resourceType": "Patient", "name": [{"family": f"Atomic{tag}"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                # an update of a resource that names a different id than its URL: must fail
                "resource": {"resourceType": "Patient", "id": "mismatch-a", "name": [{"family": f"Atomic{tag}"}]},
                "request": {"method": "PUT", "url": "Patient/mismatch-b"},
            },
        ],
    }
    with pytest.raises(OperationOutcome):
        client.execute("", method="post", data=bundle)
    # nothing from the failed transaction is visible
    assert client.resources("Patient").search(family=f"Atomic{tag}").fetch_all() == []


def test_delete_then_read_is_gone(client, tag):
    patient = new_patient(client, tag, given="Del")
    patient.save()
    pid = patient.id
    patient.delete()

    with pytest.raises(BaseFHIRError) as err:
        client.get("Patient", pid)
    # fhirpy maps 404 and 410 to ResourceNotFound; FHIR R4 says a deleted resource reads as 410 Gone
    assert isinstance(err.value, (ResourceNotFound, OperationOutcome))
    raw = requests.get(f"{BASE_URL}/Patient/{pid}", headers={"Accept": "application/fhir+json", **AUTH}, timeout=30)
    assert raw.status_code == 410, (raw.status_code, raw.text)
    # deleted resources drop out of search
    assert client.resources("Patient").search(identifier=f"{ID_SYSTEM}|MRN-{tag}-Del").fetch_all() == []
    # deleting again is fine (idempotent: 200/204, never an error)
    client.delete("Patient", pid)
    # an id that never existed reads as 404
    with pytest.raises(ResourceNotFound):
        client.get("Patient", f"never-{tag}")
    raw = requests.get(f"{BASE_URL}/Patient/never-{tag}", headers=AUTH, timeout=30)
    assert raw.status_code == 404, (raw.status_code, raw.text)
