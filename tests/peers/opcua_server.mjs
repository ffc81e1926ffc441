// Independent OPC UA peer server (node-opcua) with a few variables of known values.
// Usage: PEER_DIR=<dir with node_modules> node opcua_server.mjs <port> <pki dir>
// Prints "READY <endpoint>" on stdout once listening; exits on SIGTERM.
import { createRequire } from "node:module";

const require = createRequire(`${process.env.PEER_DIR}/`);
const {
  OPCUAServer, OPCUACertificateManager, DataType, Variant, StatusCodes, nodesets,
} = require("node-opcua");

const port = Number.parseInt(process.argv[2], 10);
const pki = process.argv[3];

const server = new OPCUAServer({
  port,
  host: "127.0.0.1",
  hostname: "127.0.0.1",
  resourcePath: "/peer",
  nodeset_filename: [nodesets.standard],
  serverCertificateManager: new OPCUACertificateManager({
    rootFolder: pki,
    automaticallyAcceptUnknownCertificate: true,
  }),
  buildInfo: { productName: "tpo-edge node-opcua peer", buildNumber: "1" },
});
await server.initialize();

const addressSpace = server.engine.addressSpace;
const ns = addressSpace.registerNamespace("urn:tpo-edge:peer");
const machines = ns.addFolder(addressSpace.rootFolder.objects, { browseName: "Machines" });
const press = ns.addObject({ organizedBy: machines, browseName: "Press-1", nodeId: "s=Press-1" });

const variables = [
  ["Pressure", DataType.Double, 123.5],
  ["Temperature", DataType.Float, 42.25],
  ["Running", DataType.Boolean, true],
  ["StrokeCount", DataType.UInt32, 4711],
  ["State", DataType.Int32, 3],
];
for (const [name, dataType, value] of variables) {
  const v = ns.addVariable({
    componentOf: press, browseName: name, nodeId: `s=Press-1.${name}`, dataType: DataType[dataType],
  });
  v.setValueFromSource(new Variant({ dataType, value }), StatusCodes.Good);
}
const broken = ns.addVariable({
  componentOf: press, browseName: "OilLevel", nodeId: "s=Press-1.OilLevel", dataType: "Double",
});
broken.setValueFromSource(new Variant({ dataType: DataType.Double, value: 87.5 }), StatusCodes.BadSensorFailure);

// One changing value so subscriptions see more than the initial notification.
const ticker = ns.addVariable({
  componentOf: press, browseName: "Ticks", nodeId: "s=Press-1.Ticks", dataType: "UInt32",
});
let ticks = 0;
ticker.setValueFromSource(new Variant({ dataType: DataType.UInt32, value: ticks }));
const timer = setInterval(() => {
  ticks += 1;
  ticker.setValueFromSource(new Variant({ dataType: DataType.UInt32, value: ticks }));
}, 100);

await server.start();
console.log(`READY ${server.getEndpointUrl()}`);

const stop = async () => {
  clearInterval(timer);
  await server.shutdown(0);
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
