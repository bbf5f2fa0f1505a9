// A real third-party client (fhir-kit-client, unmodified) against a running Custos server.
//
// Run: CUSTOS_FHIR_URL=http://127.0.0.1:8080 CUSTOS_TOKEN=<bearer token> node --test tests/clients/js/
// (crates/cli/tests/fhir_clients.rs starts a server, gets a SMART Backend Services
// token with system/*.cruds, and does this; see .ci/run.)
//
// Each run tags its data with a fresh random token so it can run repeatedly
// against the same server and still make exact assertions.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';

import { Client, RESPONSE_KEY } from 'fhir-kit-client';

const BASE_URL = (process.env.CUSTOS_FHIR_URL || '').replace(/\/+$/, '');
const ID_SYSTEM = 'urn:oid:2.16.840.1.113883.4.642.99.1';
const LOINC = 'http://loinc.org';
const HEART_RATE = '8867-4';
const BODY_WEIGHT = '29463-7';

// Every FHIR request but /metadata needs a bearer token.
const TOKEN = process.env.CUSTOS_TOKEN || '';

const skip = BASE_URL && TOKEN ? false : 'set CUSTOS_FHIR_URL to a running Custos server and CUSTOS_TOKEN to a token';
const client = skip ? null : new Client({ baseUrl: BASE_URL, bearerToken: TOKEN });

function newTag() {
  const letters = 'abcdefghijklmnopqrstuvwxyz';
  let t = '';
  for (let i = 0; i < 12; i += 1) t += letters[Math.floor(Math.random() * letters.length)];
  return t;
}

function randomBirthDate() {
  const r = (lo, hi) => lo + Math.floor(Math.random() * (hi - lo + 1));
  return `${r(1901, 1949)}-${String(r(1, 12)).padStart(2, '0')}-${String(r(1, 28)).padStart(2, '0')}`;
}

function patientBody(tag, { given = 'Ada', birthDate = '1970-05-17', gender = 'female' } = {}) {
  return {
    resourceType: 'Patient',
    name: [{ use: 'official', family: `Custos${tag}`, given: [given] }],
    identifier: [{ system: ID_SYSTEM, value: `MRN-${tag}-${given}` }],
    birthDate,
    gender,
    telecom: [
      { system: 'phone', value: '+1-555-0100', use: 'home' },
      { system: 'email', value: `${tag}@example.org` },
    ],
  };
}

// ids of the matches in a searchset Bundle (outcome entries are not matches)
function matchIds(bundle, resourceType) {
  assert.equal(bundle.resourceType, 'Bundle');
  assert.equal(bundle.type, 'searchset');
  return (bundle.entry || [])
    .filter((e) => e.resource.resourceType === resourceType)
    .map((e) => e.resource.id)
    .sort();
}

// "Type/id/_history/vid", possibly absolute -> [Type, id]
function typeAndId(location) {
  const parts = location.split('/_history/')[0].split('/');
  return [parts[parts.length - 2], parts[parts.length - 1]];
}

async function httpStatusOf(promise) {
  try {
    await promise;
  } catch (err) {
    if (err.response) return err.response.status;
    throw err;
  }
  return 200;
}

describe('fhir-kit-client against Custos', { skip }, () => {
  test('capabilityStatement', async () => {
    const cs = await client.capabilityStatement();
    assert.equal(cs.resourceType, 'CapabilityStatement');
    assert.equal(cs.fhirVersion, '4.0.1');
    const rest = cs.rest[0];
    assert.equal(rest.mode, 'server');
    for (const type of ['Patient', 'Observation']) {
      const res = rest.resource.find((r) => r.type === type);
      assert.ok(res, `${type} in CapabilityStatement`);
      const codes = res.interaction.map((i) => i.code);
      for (const c of ['read', 'create', 'update', 'delete', 'search-type']) assert.ok(codes.includes(c), `${type} ${c}`);
    }
    assert.ok((rest.interaction || []).some((i) => i.code === 'transaction'));
  });

  test('requests without a valid token are refused', async () => {
    const anonymous = new Client({ baseUrl: BASE_URL });
    assert.equal((await anonymous.capabilityStatement()).resourceType, 'CapabilityStatement');
    assert.equal(await httpStatusOf(anonymous.search({ resourceType: 'Patient', searchParams: {} })), 401);
    const forged = new Client({ baseUrl: BASE_URL, bearerToken: `${TOKEN}x` });
    assert.equal(await httpStatusOf(forged.search({ resourceType: 'Patient', searchParams: {} })), 401);
  });

  test('create, read, update, vread, search', async () => {
    const tag = newTag();
    const birthDate = randomBirthDate();
    const created = await client.create({ resourceType: 'Patient', body: patientBody(tag, { birthDate }) });
    assert.equal(created.resourceType, 'Patient');
    assert.ok(created.id);
    assert.equal(created.meta.versionId, '1');
    const createResponse = created[RESPONSE_KEY];
    assert.equal(createResponse.status, 201);
    assert.match(createResponse.headers.get('location'), new RegExp(`Patient/${created.id}/_history/1$`));
    assert.equal(createResponse.headers.get('etag'), 'W/"1"');

    const read = await client.read({ resourceType: 'Patient', id: created.id });
    assert.equal(read.id, created.id);
    assert.equal(read.name[0].family, `Custos${tag}`);
    assert.deepEqual(read.identifier[0], { system: ID_SYSTEM, value: `MRN-${tag}-Ada` });
    assert.equal(read.birthDate, birthDate);
    assert.equal(read.gender, 'female');
    assert.equal(read.telecom.length, 2);
    assert.equal(read.meta.versionId, '1');

    const updated = await client.update({
      resourceType: 'Patient',
      id: created.id,
      body: { ...read, gender: 'other', active: true },
    });
    assert.equal(updated[RESPONSE_KEY].status, 200);
    assert.equal(updated.meta.versionId, '2');
    assert.equal(updated.gender, 'other');
    const reread = await client.read({ resourceType: 'Patient', id: created.id });
    assert.equal(reread.meta.versionId, '2');
    assert.equal(reread.gender, 'other');
    assert.equal(reread.active, true);
    // version-aware update: a stale If-Match is refused with 412, the current one succeeds
    const stale = client.update({
      resourceType: 'Patient',
      id: created.id,
      body: { ...reread, gender: 'unknown' },
      options: { headers: { 'If-Match': 'W/"1"' } },
    });
    assert.equal(await httpStatusOf(stale), 412);
    assert.equal((await client.read({ resourceType: 'Patient', id: created.id })).gender, 'other');
    const fresh = await client.update({
      resourceType: 'Patient',
      id: created.id,
      body: { ...reread, gender: 'other', active: true },
      options: { headers: { 'If-Match': 'W/"2"' } },
    });
    assert.equal(fresh.meta.versionId, '3');
    const v1 = await client.vread({ resourceType: 'Patient', id: created.id, version: '1' });
    assert.equal(v1.gender, 'female');
    assert.equal(v1.meta.versionId, '1');

    const other = await client.create({
      resourceType: 'Patient',
      body: patientBody(tag, { given: 'Grace', birthDate: '1971-01-01', gender: 'male' }),
    });
    const both = [created.id, other.id].sort();

    const search = (searchParams, options) => client.search({ resourceType: 'Patient', searchParams, options });
    assert.deepEqual(matchIds(await search({ family: `Custos${tag}` }), 'Patient'), both);
    assert.deepEqual(matchIds(await search({ family: `custos${tag.toUpperCase()}` }), 'Patient'), both);
    assert.deepEqual(matchIds(await search({ family: `Custos${tag}`, given: 'grace' }), 'Patient'), [other.id]);
    assert.deepEqual(
      matchIds(await search({ identifier: `${ID_SYSTEM}|MRN-${tag}-Ada` }), 'Patient'),
      [created.id],
    );
    assert.deepEqual(matchIds(await search({ identifier: `urn:other|MRN-${tag}-Ada` }), 'Patient'), []);
    assert.ok(matchIds(await search({ birthdate: birthDate }), 'Patient').includes(created.id));
    assert.deepEqual(
      matchIds(await search({ family: `Custos${tag}`, birthdate: birthDate }), 'Patient'),
      [created.id],
    );
    assert.deepEqual(
      matchIds(await search({ family: `Custos${tag}`, birthdate: 'ge1971-01-01' }), 'Patient'),
      [other.id],
    );
    assert.deepEqual(matchIds(await search({ family: `Custos${tag}`, gender: 'other' }), 'Patient'), [created.id]);
    // update-as-create with a client-assigned id
    const ownId = `js-${tag}`;
    const put = await client.update({ resourceType: 'Patient', id: ownId, body: { resourceType: 'Patient', id: ownId, active: false } });
    assert.equal(put[RESPONSE_KEY].status, 201);
    assert.equal(put.id, ownId);
    assert.equal(put.meta.versionId, '1');
    const history = await client.history({ resourceType: 'Patient', id: created.id });
    assert.equal(history.type, 'history');
    assert.deepEqual(history.entry.map((e) => e.resource.meta.versionId).sort(), ['1', '2', '3']);
    // POST _search with a form body
    assert.deepEqual(
      matchIds(await search({ family: `Custos${tag}` }, { postSearch: true }), 'Patient'),
      both,
    );

    // count: _summary=count and _count=0 give the total without entries
    const counted = await search({ family: `Custos${tag}`, _summary: 'count' });
    assert.equal(counted.total, 2);
    assert.deepEqual(matchIds(counted, 'Patient'), []);
    assert.equal((await search({ family: `Custos${tag}`, _count: 0 })).total, 2);

    // paging through next links, one result per page
    const page1 = await search({ family: `Custos${tag}`, _count: 1 });
    assert.equal(page1.total, 2);
    assert.equal(matchIds(page1, 'Patient').length, 1);
    const page2 = await client.nextPage({ bundle: page1 });
    assert.ok(page2, 'first page must link to the next');
    assert.deepEqual([...matchIds(page1, 'Patient'), ...matchIds(page2, 'Patient')].sort(), both);
    const page3 = client.nextPage({ bundle: page2 });
    if (page3 !== undefined) assert.deepEqual(matchIds(await page3, 'Patient'), []);
  });

  test('Observation search by patient and code', async () => {
    const tag = newTag();
    const patient = await client.create({ resourceType: 'Patient', body: patientBody(tag) });
    const ref = `Patient/${patient.id}`;
    const hr = await client.create({
      resourceType: 'Observation',
      body: {
        resourceType: 'Observation',
        status: 'final',
        code: { coding: [{ system: LOINC, code: HEART_RATE, display: 'Heart rate' }] },
        subject: { reference: ref },
        effectiveDateTime: '2024-03-01T10:00:00Z',
        valueQuantity: { value: 72, unit: 'beats/minute', system: 'http://unitsofmeasure.org', code: '/min' },
      },
    });
    const weight = await client.create({
      resourceType: 'Observation',
      body: {
        resourceType: 'Observation',
        status: 'final',
        code: { coding: [{ system: LOINC, code: BODY_WEIGHT }] },
        subject: { reference: ref },
        effectiveDateTime: '2024-03-02',
        valueQuantity: { value: 61.5, unit: 'kg', system: 'http://unitsofmeasure.org', code: 'kg' },
      },
    });
    const search = (searchParams) => client.search({ resourceType: 'Observation', searchParams });
    assert.deepEqual(matchIds(await search({ patient: ref }), 'Observation'), [hr.id, weight.id].sort());
    assert.deepEqual(matchIds(await search({ subject: ref }), 'Observation'), [hr.id, weight.id].sort());
    assert.deepEqual(
      matchIds(await search({ patient: patient.id, code: `${LOINC}|${HEART_RATE}` }), 'Observation'),
      [hr.id],
    );
    assert.deepEqual(matchIds(await search({ patient: ref, code: BODY_WEIGHT }), 'Observation'), [weight.id]);
    assert.deepEqual(matchIds(await search({ patient: ref, code: `${LOINC}|0000-0` }), 'Observation'), []);
  });

  test('transaction with a urn:uuid reference', async () => {
    const tag = newTag();
    const patientUrn = `urn:uuid:${randomUUID()}`;
    const body = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: patientUrn,
          resource: {
            resourceType: 'Patient',
            name: [{ family: `Txn${tag}`, given: ['Tess'] }],
            identifier: [{ system: ID_SYSTEM, value: `TXN-${tag}` }],
            birthDate: '1988-08-08',
          },
          request: { method: 'POST', url: 'Patient' },
        },
        {
          fullUrl: `urn:uuid:${randomUUID()}`,
          resource: {
            resourceType: 'Observation',
            status: 'final',
            code: { coding: [{ system: LOINC, code: HEART_RATE }] },
            subject: { reference: patientUrn },
            valueQuantity: { value: 64, unit: 'beats/minute', system: 'http://unitsofmeasure.org', code: '/min' },
          },
          request: { method: 'POST', url: 'Observation' },
        },
      ],
    };
    const resp = await client.transaction({ body });
    assert.equal(resp[RESPONSE_KEY].status, 200);
    assert.equal(resp.resourceType, 'Bundle');
    assert.equal(resp.type, 'transaction-response');
    assert.equal(resp.entry.length, 2);
    for (const e of resp.entry) {
      assert.match(e.response.status, /^201/);
      assert.match(e.response.location, /\/_history\/1$/);
    }
    const [pType, pid] = typeAndId(resp.entry[0].response.location);
    const [oType, oid] = typeAndId(resp.entry[1].response.location);
    assert.deepEqual([pType, oType], ['Patient', 'Observation']);
    const obs = await client.read({ resourceType: 'Observation', id: oid });
    assert.equal(obs.subject.reference, `Patient/${pid}`);
    const found = await client.search({ resourceType: 'Observation', searchParams: { patient: `Patient/${pid}` } });
    assert.deepEqual(matchIds(found, 'Observation'), [oid]);
  });

  test('failed transaction changes nothing', async () => {
    const tag = newTag();
    const body = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: `urn:uuid:${randomUUID()}`,
          resource: { resourceType: 'Patient', name: [{ family: `Atomic${tag}` }] },
          request: { method: 'POST', url: 'Patient' },
        },
        {
          resource: { resourceType: 'Patient', id: 'mismatch-a', name: [{ family: `Atomic${tag}` }] },
          request: { method: 'PUT', url: 'Patient/mismatch-b' },
        },
      ],
    };
    const status = await httpStatusOf(client.transaction({ body }));
    assert.ok(status >= 400 && status < 500, `expected a 4xx, got ${status}`);
    const found = await client.search({ resourceType: 'Patient', searchParams: { family: `Atomic${tag}` } });
    assert.deepEqual(matchIds(found, 'Patient'), []);
  });

  test('delete, then read is 410 Gone', async () => {
    const tag = newTag();
    const patient = await client.create({ resourceType: 'Patient', body: patientBody(tag, { given: 'Del' }) });
    const del = await client.delete({ resourceType: 'Patient', id: patient.id });
    assert.ok([200, 204].includes(del[RESPONSE_KEY].status));
    assert.equal(await httpStatusOf(client.read({ resourceType: 'Patient', id: patient.id })), 410);
    const found = await client.search({
      resourceType: 'Patient',
      searchParams: { identifier: `${ID_SYSTEM}|MRN-${tag}-Del` },
    });
    assert.deepEqual(matchIds(found, 'Patient'), []);
    // deleting again is not an error
    const again = await client.delete({ resourceType: 'Patient', id: patient.id });
    assert.ok([200, 204].includes(again[RESPONSE_KEY].status));
    assert.equal(await httpStatusOf(client.read({ resourceType: 'Patient', id: `never-${tag}` })), 404);
  });
});
