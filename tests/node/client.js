// A client of the service in another language: @grpc/grpc-js with the protos loaded at run time
// by @grpc/proto-loader, as a Node.js backend would call it.
//
//   node client.js ADDRESS SECRET
//
// SECRET is an organization-wide owner key. The client creates an environment, a key scoped to
// it, verifies that key, provokes a rich error (a slug that is taken) and decodes its
// google.rpc.Status from the `grpc-status-details-bin` trailer. It prints one JSON object with
// what it saw and exits 0, or prints the failure and exits 1.
//
// The protos import google/api/annotations.proto and the error details live in google/rpc: both
// come from the googleapis-common-protos Python package. AGENTPOST_GOOGLEAPIS_PROTOS names its
// install root (the test passes it).

"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const GOOGLEAPIS = process.env.AGENTPOST_GOOGLEAPIS_PROTOS;
const PACKAGE = "agentpost.environments.v1";
const ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo";

function fail(message) {
  process.stderr.write(`node client: ${message}\n`);
  process.exit(1);
}

function includeDirs() {
  if (!GOOGLEAPIS) fail("set AGENTPOST_GOOGLEAPIS_PROTOS to the googleapis-common-protos install root");
  return [PROTOS, GOOGLEAPIS];
}

function loadServices(address) {
  const definition = protoLoader.loadSync(
    ["environment.proto", "api_key.proto"].map((file) => `agentpost/environments/v1/${file}`),
    // Field names as in the proto (snake_case), enums as their names.
    { keepCase: true, enums: String, longs: String, defaults: true, includeDirs: includeDirs() },
  );
  const api = grpc.loadPackageDefinition(definition).agentpost.environments.v1;
  const credentials = grpc.credentials.createInsecure();
  return {
    environments: new api.EnvironmentService(address, credentials),
    apiKeys: new api.ApiKeyService(address, credentials),
  };
}

function loadStatusTypes() {
  const root = new protobuf.Root();
  const dirs = includeDirs();
  root.resolvePath = (_origin, target) => {
    for (const dir of dirs) {
      const candidate = path.join(dir, target);
      if (fs.existsSync(candidate)) return candidate;
    }
    return target;
  };
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
  return { Status: root.lookupType("google.rpc.Status"), ErrorInfo: root.lookupType("google.rpc.ErrorInfo") };
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata || new grpc.Metadata(), { deadline: Date.now() + 10_000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function bearer(secret) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${secret}`);
  return metadata;
}

// The ErrorInfo of a failed call, from the google.rpc.Status in its trailers.
function errorInfo(error, types) {
  const [details] = error.metadata.get("grpc-status-details-bin");
  if (!details) fail(`no grpc-status-details-bin on ${error.code} ${error.details}`);
  const status = types.Status.decode(details);
  const packed = status.details.find((any) => any.type_url === ERROR_INFO_TYPE);
  if (!packed) fail("the status carries no ErrorInfo");
  const info = types.ErrorInfo.decode(packed.value);
  return { code: status.code, reason: info.reason, domain: info.domain, metadata: info.metadata };
}

async function main() {
  const [address, secret] = process.argv.slice(2);
  if (!address || !secret) fail("usage: node client.js ADDRESS SECRET");
  const { environments, apiKeys } = loadServices(address);
  const types = loadStatusTypes();
  const slug = `node-${Date.now().toString(36)}`;

  const environment = await call(environments, "CreateEnvironment", { name: "Node client", slug }, bearer(secret));
  const created = await call(
    apiKeys,
    "CreateApiKey",
    { name: "node scoped", scopes: ["inboxes:read"], environment_ids: [environment.id] },
    bearer(secret),
  );
  const verification = await call(apiKeys, "VerifyApiKey", {
    secret: created.secret,
    environment: slug,
    required_scopes: ["inboxes:read"],
  });
  let taken = null;
  try {
    await call(environments, "CreateEnvironment", { name: "Node client again", slug }, bearer(secret));
  } catch (error) {
    taken = { grpc_code: error.code, ...errorInfo(error, types) };
  }
  if (taken === null) fail("creating an environment with a taken slug succeeded");

  process.stdout.write(
    `${JSON.stringify({
      environment: { id: environment.id, slug: environment.slug, state: environment.state },
      api_key: { id: created.api_key.id, environment_ids: created.api_key.environment_ids },
      verification: {
        valid: verification.valid,
        denial_reason: verification.denial_reason,
        api_key_id: verification.principal.api_key_id,
        environment_id: verification.principal.environment_id,
      },
      slug_taken: taken,
    })}\n`,
  );
  environments.close();
  apiKeys.close();
}

main().catch((error) => fail(`${error.code ?? ""} ${error.details ?? error.stack ?? error}`));
